"""NVFP4 experts' kernels on one GPU, over their options, each against its XLA reference:

    python benchmarks/nvfp4_probe.py [--layers 4] [--pairs-shapes TP1 TP4] [--grouped-rows 16 64 256]

- pairs (`minimax_jax.ops.pair_experts.pair_products_nvfp4`): one token's 8 expert pairs under
  MoE-TP on TP1 and TP4 (gate/up 2 x 1536 / tp rows over 3072, down 3072 rows over 1536 / tp),
  beside the path before the kernel (the pairs' experts gathered and dequantised to bf16, then an
  einsum);
- grouped (`minimax_jax.ops.grouped_gemm_nvfp4.aligned_gemm_nvfp4`): every one of 256 local
  experts (--grouped-experts) with --grouped-rows rows each (16 or 64: a decode step's one tile
  an expert, each expert's weights read once; 256: a prefill step's share), gate/up and down.

Each variant widens the codes by inline PTX to fp32 ("ptx"), by inline PTX to bf16 with the
block scales applied (grouped only: "scaled"), or through E4M3 (`widen`). Weight bytes are 0.5625
a weight (codes and scales); each call reads another of --layers stacked layers, and the time is
the device's, from a profiler trace. At the default 4 layers the down codes of 256 experts hold
2-4 GiB, which the grouped kernel reads after copying the layer out (`triton_common.offsets_wrap`):
its down figures include that copy, the same for every variant (at 8 layers the 256-expert section
ran out of memory on an H200). Prints one line per variant: device time per call, the
weight bytes' bandwidth (and for grouped the bf16 TFLOP/s), and the error against the reference.
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.fp8_linear_probe import measure  # noqa: E402
from minimax_jax.ops import grouped_gemm_nvfp4, pair_experts  # noqa: E402

PAIR_SHAPES = {"TP1": ((3072, 3072), (3072, 1536)), "TP2": ((1536, 3072), (3072, 768)),
               "TP4": ((768, 3072), (3072, 384))}
PAIRS, PAIR_EXPERTS, GROUPED_EXPERTS = 8, 32, 256
BYTES_PER_WEIGHT = 0.5625


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="stacked layers each call cycles through")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--pairs-shapes", nargs="*", default=["TP1", "TP4"], choices=list(PAIR_SHAPES))
    p.add_argument("--grouped-rows", type=int, nargs="*", default=[16, 64, 256],
                   help="rows per expert (multiples of 16)")
    p.add_argument("--grouped-experts", type=int, default=GROUPED_EXPERTS)
    args = p.parse_args()
    interpret = jax.default_backend() != "gpu"          # a CPU run checks the numbers only
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    table = []
    pair_variants = {"xla dequantise + einsum": _pairs_xla}
    for widen in ("ptx", "e4m3"):
        for block_n, splits in ((32, None), (64, None), (32, 1)):
            pair_variants[f"{widen} block_n={block_n} splits={splits or 'auto'}"] = functools.partial(
                pair_experts.pair_products_nvfp4, widen=widen, block_n=block_n, splits=splits, interpret=interpret)
    experts = jax.random.randint(keys[2], (PAIRS,), 0, PAIR_EXPERTS)
    for tp in args.pairs_shapes:
        for product, (n, k) in zip(("gate/up", "down"), PAIR_SHAPES[tp]):
            codes, scales, g = _weights(keys[0], (args.layers, PAIR_EXPERTS, n, k))
            x = jax.random.normal(keys[1], (PAIRS, k), jnp.bfloat16)
            ref = pair_experts.reference_nvfp4(x, codes, scales, g, 1, experts)
            for name, fn in pair_variants.items():
                call = lambda x, c, s, g, layer, fn=fn: fn(x, c, s, g, layer, experts)  # noqa: E731
                table += measure(f"{product} {tp} pairs={PAIRS}", name, call, (x, codes, scales, g), ref,
                                 int(PAIRS * n * k * BYTES_PER_WEIGHT), args)
    grouped_variants = {f"{widen} m={bm} n={bn} k={bk} warps={warps}": dict(
        widen=widen, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, interpret=interpret)
        for widen, bm, bn, bk, warps in (("ptx", 16, 128, 128, 4), ("scaled", 16, 128, 128, 4),
                                         ("scaled", 16, 128, 256, 4), ("ptx", 64, 128, 128, 4),
                                         ("scaled", 64, 128, 128, 4), ("ptx", 128, 128, 128, 8),
                                         ("ptx", 128, 256, 128, 8), ("scaled", 128, 256, 128, 8),
                                         ("e4m3", 64, 128, 128, 4))}
    for rows_per_expert in args.grouped_rows:
        e = args.grouped_experts
        m = e * rows_per_expert
        for product, (n, k) in (("gate/up", (3072, 3072)), ("down", (3072, 1536))):
            codes, scales, g = _weights(keys[0], (args.layers, e, n, k))
            rows = jax.random.normal(keys[1], (m, k), jnp.bfloat16)
            ref = grouped_gemm_nvfp4.reference(rows, jnp.repeat(jnp.arange(e, dtype=jnp.int32), rows_per_expert // 16),
                                               codes, scales, g, 1, block_m=16)
            for name, opts in grouped_variants.items():
                if rows_per_expert % opts["block_m"] or rows_per_expert > 4 * opts["block_m"]:
                    continue        # (tiles of 16 rows are timed up to 64 rows an expert)
                groups = jnp.repeat(jnp.arange(e, dtype=jnp.int32), rows_per_expert // opts["block_m"])
                fn = functools.partial(grouped_gemm_nvfp4.aligned_gemm_nvfp4, **opts)
                call = lambda x, c, s, g, layer, fn=fn, groups=groups: fn(x, groups, c, s, g, layer)  # noqa: E731
                table += measure(f"{product} {rows_per_expert} rows x {e}", name, call, (rows, codes, scales, g), ref,
                                 int(e * n * k * BYTES_PER_WEIGHT), args, flops=2 * m * n * k)
    print(f"\n{'shape':<26} {'variant':<40} {'us':>8} {'TB/s':>6} {'TFLOP/s':>8} {'max err':>8}")
    for shape_name, name, seconds, nbytes, err, flops in table:
        print(f"{shape_name:<26} {name:<40} {seconds * 1e6:>8.1f} {nbytes / seconds / 1e12:>6.2f} "
              f"{flops / seconds / 1e12:>8.1f} {err:>8.1e}")
    return 0


def _weights(key, shape):
    """Random codes, E4M3 scales of 0.01 and global scales of 1 (weights of std about 0.02)."""
    layers, experts, n, k = shape
    codes = jax.random.bits(key, (layers, experts, n, k // 2), jnp.uint8)
    scales = jnp.full((layers, experts, n, k // 16), 0.01, jnp.float32).astype(jnp.float8_e4m3fn)
    return codes, scales, jnp.ones((layers, experts, 1), jnp.float32)


def _pairs_xla(x, codes, scales, g, layer, experts):
    """The pairs' experts gathered, dequantised to bf16, then one einsum (the path without the kernel)."""
    from quant import nvfp4
    w = nvfp4.dequantize(nvfp4.NVFP4Array(codes[layer][experts], scales[layer][experts],
                                          g[layer][experts][..., None]), jnp.bfloat16)
    return jnp.einsum("rk,rnk->rn", x, w, preferred_element_type=jnp.float32)


if __name__ == "__main__":
    sys.exit(main())
