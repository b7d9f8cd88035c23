"""Compiles and checks one configuration of the FP8 grouped GEMM on a GPU, in its own process so
that a compile which never finishes can be timed out alone:

    timeout 90 python benchmarks/fp8_kernel_probe.py --load-layout none --chunk-rows 64
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minimax_jax.ops import grouped_gemm_fp8, mosaic_common  # noqa: E402
from quant import fp8  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-layout", default="none", help="plgpu.Layout name, or 'none' (layout inference)")
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--block-m", type=int, default=64)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2, help="pipeline depth")
    p.add_argument("--per-sm", type=int, default=2, help="thread blocks per SM")
    p.add_argument("--w8a8", action="store_true", help="the W8A8 kernel (rows rounded to FP8) instead")
    args = p.parse_args()
    layout = None if args.load_layout.lower() == "none" else args.load_layout
    g, n, k = 64, 3072, 3072
    w, scale = fp8.quantize_blockwise(jax.random.normal(jax.random.PRNGKey(0), (g, n, k), jnp.float32) * 0.02)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.rows, k), jnp.bfloat16)
    sizes = jnp.asarray(np.random.RandomState(3).multinomial(args.rows, np.ones(g) / g), jnp.int32)
    options = dict(block_m=args.block_m, max_concurrent_steps=args.steps,
                   num_blocks=args.per_sm * mosaic_common.sm_count())
    if args.w8a8:
        f = jax.jit(lambda x, w, s, sizes: grouped_gemm_fp8.grouped_gemm_w8a8(x, w, s, sizes, **options))
    else:
        f = jax.jit(lambda x, w, s, sizes: grouped_gemm_fp8.grouped_gemm_fp8(
            x, w, s, sizes, chunk_rows=args.chunk_rows, load_layout=layout, **options))
    start = time.perf_counter()
    out = jax.block_until_ready(f(x, w, scale, sizes))
    print(f"compiled and ran in {time.perf_counter() - start:.1f} s", flush=True)
    ref = (grouped_gemm_fp8.reference_w8a8 if args.w8a8 else grouped_gemm_fp8.reference)(x, w, scale, sizes)
    err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(x, w, scale, sizes))
        times.append(time.perf_counter() - t)
    print(f"layout={layout} chunk={args.chunk_rows} bm={args.block_m} rows={args.rows} "
          f"steps={args.steps} per_sm={args.per_sm} w8a8={args.w8a8}: "
          f"{np.median(times) * 1e3:.3f} ms, rel err {err:.1e}, floor {w.nbytes / 3.0e12 * 1e3:.3f} ms at 3 TB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
