"""Converts an HF MiniMax-M2 checkpoint directory into a converted (orbax) checkpoint.

    python scripts/convert_hf.py /models/MiniMax-M2.5 /ckpt/MiniMax-M2.5-fp8
    python scripts/convert_hf.py /models/MiniMax-M2.5 /ckpt/m25-nvfp4 --expert-format nvfp4 --force

SRC is an HF directory (config.json + *.safetensors): bf16/fp32 weights, the released FP8 format
(128x128-block float8_e4m3fn) or an NVIDIA ModelOpt NVFP4 export. DST receives the parameter tree
of the model as an orbax checkpoint (state/) plus manifest.json; tokenizer files are copied.
Serve it with `scripts/serve.py --model-path DST` or `Engine(model_path=DST)`.

The source is streamed one layer at a time: peak memory is about one layer's tensors (and their
conversion temporaries) plus the Python/JAX baseline, whatever the model size. Output goes to a
temporary sibling `.<DST name>.converting-<pid>` renamed to DST on success; an interrupted run
leaves only that temporary, never something that loads, and the next run to the same DST removes
it. JAX runs on the CPU here (JAX_PLATFORMS=cpu unless set): conversion needs no accelerator.
See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DTYPES = ("bfloat16", "float32", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("dst", metavar="DST", help="output directory; must not exist unless --force")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the attention, norm, embedding and (bf16 format) expert weights; the router "
                        "stays float32; restoring in another float dtype casts while reading (default: %(default)s)")
    p.add_argument("--expert-format", choices=("bf16", "fp8", "nvfp4"),
                   help="format of the expert weights: bf16 (the --dtype), fp8 (128x128 E4M3 blocks) or nvfp4 "
                        "(ModelOpt); a source already in that format is copied bit for bit, otherwise "
                        "dequantised and requantised (default: the source's own format)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is an existing converted checkpoint (swapped in only once complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import jax.numpy as jnp

    from minimax_jax import checkpoint
    from minimax_jax.config import ConfigError
    from minimax_jax.safetensors_index import CheckpointError

    start = time.perf_counter()
    try:
        manifest = checkpoint.convert(args.src, args.dst, dtype=getattr(jnp, args.dtype),
                                      expert_format=args.expert_format, force=args.force, progress=not args.quiet)
    except (CheckpointError, ConfigError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {manifest['tensor_count']} tensors, {checkpoint.format_size(manifest['total_bytes'])}, "
          f"{manifest['expert_format']} experts, {manifest['dtype']} weights, in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
