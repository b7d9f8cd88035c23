"""FP8 projections and expert pairs at decode sizes, on one GPU: the Mosaic W8A8 kernel against
the Triton few-rows kernel (`minimax_jax.ops.fp8_linear`) and the pair kernel
(`minimax_jax.ops.pair_experts`), over their options (NVFP4's: benchmarks/nvfp4_probe.py):

    python benchmarks/fp8_linear_probe.py [--rows 1 16] [--layers 62] [--bf16-rows 32 64 128]

Shapes are one device's share on TP1, TP2 and TP4: the attention projections (qkv rows 8192 / tp,
o rows 3072 over 6144 / tp columns) and one token's 8 expert pairs under MoE-TP (gate/up 2 x 1536
/ tp rows over 3072, down 3072 rows over 1536 / tp). Each call reads another layer of --layers
stacked weights (none stays in L2), and the time is the device's: the kernels' durations summed
from a profiler trace (a few-microsecond kernel timed by the wall clock is the host's launch
rate). Prints one line per variant: device time per call, the weight bytes' bandwidth, and the
error against the reference (the W8A8 product for the Mosaic kernel, the weight-only product for
the Triton kernels, which take the rows unrounded). --bf16-rows: the same projections with bf16
weights (an NVFP4 or bf16 checkpoint's attention) at more rows than one request's, XLA's GEMM on
the layer it copies out of the stacked weights against the Triton kernel reading it in place.
"""
import argparse
import functools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minimax_jax.model import project  # noqa: E402
from minimax_jax.ops import fp8_linear, pair_experts  # noqa: E402
from scripts.bench import read_trace  # noqa: E402

PROJECTIONS = {"qkv TP1": (8192, 3072), "o TP1": (3072, 6144), "qkv TP2": (4096, 3072), "o TP2": (3072, 3072),
               "qkv TP4": (2048, 3072), "o TP4": (3072, 1536)}
EXPERTS = {"gate/up TP1": (3072, 3072), "down TP1": (3072, 1536), "gate/up TP2": (1536, 3072), "down TP2": (3072, 768),
           "gate/up TP4": (768, 3072), "down TP4": (3072, 384)}
PAIRS, LOCAL_EXPERTS = 8, 32        # one token's pairs; experts per layer held here (the bytes read are the pairs')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--layers", type=int, default=62)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--shapes", nargs="+", help="only the shapes whose names hold one of these (e.g. TP1 gate/up)")
    p.add_argument("--bf16-rows", type=int, nargs="*", default=[],
                   help=f"rows of the bf16 projections' section (up to {fp8_linear.BF16_ROWS}; none: skipped)")
    args = p.parse_args()
    interpret = jax.default_backend() != "gpu"      # a CPU run checks the variants' numbers only
    triton = {f"triton block_n={b} splits={s} stages={st}": dict(block_n=b, splits=s, num_stages=st, interpret=interpret)
              for b, s, st in ((32, 1, 3), (32, 2, 3), (32, 4, 3), (16, 4, 3), (32, 4, 4), (64, 4, 3), (32, 8, 3),
                               (16, 8, 3))}
    linears = {"mosaic-ws-w8a8": functools.partial(fp8_linear.fp8_linear, kernel="mosaic-ws-w8a8")}
    linears.update({name: functools.partial(fp8_linear.few_rows, **opts) for name, opts in triton.items()})
    table = []
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    wanted = lambda name: not args.shapes or any(part in name for part in args.shapes)  # noqa: E731
    for shape_name, (n, k) in filter(lambda item: wanted(item[0]), PROJECTIONS.items()):
        w, scale = _weights(keys[0], (args.layers, n, k))
        for rows in args.rows:
            x = jax.random.normal(keys[1], (rows, k), jnp.bfloat16)
            refs = {rounded: fp8_linear.reference(x, w[1], scale[1], round_rows=rounded) for rounded in (True, False)}
            for name, linear in linears.items():
                ref = refs[name.startswith("mosaic")]      # the Triton kernels take the rows unrounded
                table += measure(f"{shape_name} rows={rows}", name, linear, (x, w, scale), ref, n * k, args)
    table += _bf16_projections(args, keys, wanted, interpret)
    experts = jax.random.randint(keys[2], (PAIRS,), 0, LOCAL_EXPERTS)
    for shape_name, (n, k) in filter(lambda item: wanted(item[0]), EXPERTS.items()):
        w, scale = _weights(keys[0], (args.layers, LOCAL_EXPERTS, n, k))
        x = jax.random.normal(keys[1], (PAIRS, k), jnp.bfloat16)
        ref = pair_experts.reference(x, w, scale, 1, experts)
        for name, opts in triton.items():
            products = functools.partial(pair_experts.pair_products, **opts)
            call = lambda x, w, scale, layer, products=products: products(x, w, scale, layer, experts)  # noqa: E731
            table += measure(f"{shape_name} pairs={PAIRS}", name, call, (x, w, scale), ref, PAIRS * n * k, args)
    print(f"\n{'shape':<22} {'variant':<36} {'us':>7} {'TB/s':>6} {'max err':>8}")
    for shape_name, name, seconds, nbytes, err, _ in table:
        print(f"{shape_name:<22} {name:<36} {seconds * 1e6:>7.1f} {nbytes / seconds / 1e12:>6.2f} {err:>8.1e}")
    return 0


def _bf16_projections(args, keys, wanted, interpret: bool) -> list:
    """The projections with bf16 weights at --bf16-rows rows: XLA's GEMM after copying the layer
    out against `fp8_linear.few_rows` reading it in place, at its default and other blocks of channels."""
    variants = {"xla: layer copied, then a GEMM": lambda x, w, layer: project(x, w[layer].T)}
    for block_n in (None, 32, 64, 128):
        variants[f"triton block_n={block_n or 'auto'}"] = functools.partial(
            lambda x, w, layer, block_n: fp8_linear.few_rows(x, w, None, layer, block_n=block_n, interpret=interpret),
            block_n=block_n)
    table = []
    for shape_name, (n, k) in filter(lambda item: wanted(item[0]) and args.bf16_rows, PROJECTIONS.items()):
        w = jax.random.normal(keys[0], (args.layers, n, k), jnp.bfloat16) * 0.02
        for rows in args.bf16_rows:
            x = jax.random.normal(keys[1], (rows, k), jnp.bfloat16)
            ref = jnp.dot(x.astype(jnp.float32), w[1].astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
            for name, fn in variants.items():
                table += measure(f"bf16 {shape_name} rows={rows}", name, fn, (x, w), ref, 2 * n * k, args)
    return table


def _weights(key, shape):
    w = jax.random.normal(key, shape, jnp.bfloat16).astype(jnp.float8_e4m3fn)
    return w, jnp.full((*shape[:-2], shape[-2] // 128, shape[-1] // 128), 0.02, jnp.float32)


def measure(shape_name: str, name: str, fn, arrays, ref, nbytes: int, args, flops: int = 0) -> list:
    """[(shape_name, name, device seconds per call, nbytes, max error over max |ref|, flops)] of
    fn(*arrays, layer), or [] where the variant fails (reported)."""
    try:
        f = jax.jit(fn)
        out = np.asarray(f(*arrays, jnp.int32(1)), np.float32)
        ref = np.asarray(ref, np.float32)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        seconds = device_seconds(f, arrays, args) if jax.default_backend() == "gpu" else float("nan")
    except Exception as e:  # noqa: BLE001 - a variant that does not lower is reported, the rest go on
        print(f"{shape_name} {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return []
    print(f"{shape_name} {name}: {seconds * 1e6:.1f} us", flush=True)
    return [(shape_name, name, seconds, nbytes, err, flops)]


def device_seconds(f, arrays, args) -> float:
    """The kernels' device time per call, each call on another layer."""
    layers = [jnp.int32(i % args.layers) for i in range(args.iters)]
    jax.block_until_ready([f(*arrays, layer) for layer in layers[:2]])
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready([f(*arrays, layer) for layer in layers])
        trace = read_trace(Path(trace_dir))
    return sum(trace.device.values()) / args.iters / len(trace.devices) * 1e-6


if __name__ == "__main__":
    sys.exit(main())
