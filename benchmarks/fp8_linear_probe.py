"""FP8 attention projections at decode sizes, on one GPU: the Mosaic W8A8 kernel against the
Triton few-rows kernel and its options (`minimax_jax.ops.fp8_linear`):

    python benchmarks/fp8_linear_probe.py [--rows 1 2 16] [--layers 62]

Shapes are one device's share of MiniMax-M2.5's projections on TP2 and TP4 (qkv rows 8192 / tp,
o rows 3072 over 6144 / tp columns). Each variant runs over every layer of --layers stacked
weights inside one jitted scan (as the model's layer loop does: no layer's weights stay in L2),
run as one CUDA graph (XLA's command buffers for every thunk kind: a few-microsecond kernel is
otherwise timed at the host's launch rate), so the time per layer is device time. Prints one
line per variant: time per layer, the weight bytes' bandwidth, and the error against the
reference.
"""
import argparse
import functools
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1 "
                           "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minimax_jax.ops import fp8_linear  # noqa: E402
from benchmarks.probe_timing import median_seconds  # noqa: E402

SHAPES = {"qkv TP2": (4096, 3072), "o TP2": (3072, 3072), "qkv TP4": (2048, 3072), "o TP4": (3072, 1536)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--layers", type=int, default=62)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    interpret = jax.default_backend() != "gpu"      # a CPU run checks the variants' numbers only
    variants = {"mosaic-ws-w8a8": functools.partial(fp8_linear.fp8_linear, kernel="mosaic-ws-w8a8")}
    for block_n, stages in ((32, 3), (16, 3), (64, 3), (32, 2), (32, 4)):
        variants[f"triton block_n={block_n} stages={stages}"] = functools.partial(
            fp8_linear.few_rows, block_n=block_n, num_stages=stages, interpret=interpret)
    table = []
    for shape_name, (n, k) in SHAPES.items():
        keys = jax.random.split(jax.random.PRNGKey(0), 2)
        w = jax.random.normal(keys[0], (args.layers, n, k), jnp.bfloat16).astype(jnp.float8_e4m3fn)
        scale = jnp.full((args.layers, n // 128, k // 128), 0.02, jnp.float32)
        nbytes = n * k
        for rows in args.rows:
            x = jax.random.normal(keys[1], (rows, k), jnp.bfloat16)
            ref = np.asarray(fp8_linear.reference(x, w[1], scale[1]), np.float32)
            for name, linear in variants.items():
                try:
                    out = np.asarray(jax.jit(linear)(x, w, scale, jnp.int32(1)), np.float32)
                    err = float(np.abs(out - ref).max() / np.abs(ref).max())
                    seconds = median_seconds(_over_layers(linear, args.layers), args.iters, x, w, scale) / args.layers
                except Exception as e:  # noqa: BLE001 - a variant that does not lower is reported, the rest go on
                    print(f"{shape_name} rows={rows} {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                table.append((shape_name, rows, name, seconds, nbytes / seconds / 1e12, err))
                print(f"{shape_name} rows={rows} {name}: {seconds * 1e6:.1f} us/layer", flush=True)
    print(f"\n{'shape':<8} {'rows':>4} {'variant':<30} {'us/layer':>9} {'TB/s':>6} {'max err':>8}")
    for shape_name, rows, name, seconds, tbs, err in table:
        print(f"{shape_name:<8} {rows:>4} {name:<30} {seconds * 1e6:>9.1f} {tbs:>6.2f} {err:>8.1e}")
    return 0


def _over_layers(linear, layers: int):
    def run(x, w, scale):          # the arrays are arguments: captured, they would be compiled in as constants
        def one(acc, layer):
            return acc + linear(x, w, scale, layer).astype(jnp.float32)[:, :4].sum(), None
        return jax.lax.scan(one, jnp.float32(0), jnp.arange(layers))[0]
    return jax.jit(run)


if __name__ == "__main__":
    sys.exit(main())
