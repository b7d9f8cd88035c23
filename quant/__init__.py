"""Number formats: `quant.nvfp4` (E2M1 + E4M3 block scales) and `quant.fp8` (E4M3 + fp32 scales).

Model- and mesh-agnostic; see docs/quantization.md for the byte layouts and error bounds."""
