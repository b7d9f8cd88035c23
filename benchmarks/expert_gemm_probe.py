"""The experts' W8A8 kernels alone on one GPU, at a decode step's shape, in several tilings:

    python benchmarks/expert_gemm_probe.py [--tokens 256 1212] [--local-experts 64] [--layers 4]

Tokens are routed to 8 of 256 experts at random; the pairs that land on the --local-experts
experts here (all experts' share of a DEP rank, or all of them on one GPU) are laid out
group-aligned and multiplied by the gate/up kernel (SwiGLU and the FP8 rounding in its epilogue)
and the down kernel, reading each layer of --layers-deep stacked FP8 experts in place inside one
jitted scan (no layer's weights stay in L2; the host's dispatch is paid once). Variants: tiles
of 128 rows split between the two compute warpgroups by rows (the engine's tiling before
2026-11-29) and tiles of 64 rows split by columns, at the default pipeline depths (as many
stages as shared memory holds, up to 4) and others; for the gate/up kernel also tiles of 64 rows
by 128 columns whose gate and up halves are each one warpgroup's.
Each variant's down output must equal the first variant's (the same products summed in the
same order); the time per layer is printed beside the floor, the local experts' FP8 bytes over
the copy bandwidth measured in the same process.
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minimax_jax.ops import aligned_rows, grouped_gemm_ws  # noqa: E402
from quant import fp8  # noqa: E402
from scripts.bench import copy_bandwidth, copy_case, median_time  # noqa: E402

INTERPRET = jax.default_backend() != "gpu"      # a CPU run checks the variants' numbers only
# name: (block_m, the gate/up kernel's options, the down kernel's); stages unset: as many as
# shared memory holds
VARIANTS = {"128 rows by rows": (128, {}, {}),
            "64 rows by columns": (64, {}, {}),
            "64 rows by columns, down 3 stages": (64, {}, dict(max_concurrent_steps=3)),
            "64 rows, gate and up by warpgroup": (64, dict(halves_by_warpgroup=True), {}),
            "128 rows by rows, 3 stages": (128, dict(max_concurrent_steps=3), dict(max_concurrent_steps=3))}


def random_fp8_experts(key, shape):
    """FP8 experts of `shape` [..., N, K] with block scales of 2-4e-4, made on the device."""
    w = (jax.random.normal(key, shape, jnp.bfloat16) * 64).astype(jnp.float8_e4m3fn)
    scale_shape = (*shape[:-2], shape[-2] // 128, shape[-1] // 128)
    return w, jax.random.uniform(jax.random.fold_in(key, 1), scale_shape, jnp.float32, 2e-4, 4e-4)


def local_rows(tokens: int, local: int, hidden: int, key, experts: int = 256, top_k: int = 8):
    """The rows a step of `tokens` routed at random to top_k of `experts` gives the first `local`
    experts: (rows per local expert, the rows rounded to FP8 and their scales)."""
    rng = np.random.RandomState(tokens)
    ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]
    sizes = jnp.asarray(np.bincount(ids[ids < local], minlength=local), jnp.int32)
    rows = jax.random.normal(jax.random.fold_in(key, tokens), (int(sizes.sum()), hidden), jnp.bfloat16)
    return sizes, *fp8.quantize_groups(rows)


def run_variant(variant, sizes, xq, xs, experts, *, layers: int, iters: int, opts: dict):
    """One tiling on these rows: (the down output of layer 0 in the rows' order, seconds a layer
    for both kernels, seconds a layer for the gate/up kernel alone)."""
    block_m, gate_up_options, down_options = variant
    m = xq.shape[0]
    dest, groups, m_padded = aligned_rows.layout(sizes, m, block_m)
    source = aligned_rows.sources(jnp.arange(m), dest, m_padded, fill=m)
    rows = [jnp.take(a, source, axis=0, mode="fill", fill_value=0) for a in (xq, xs)]
    gate_up = functools.partial(grouped_gemm_ws.aligned_gate_up_swiglu_w8a8, block_m=block_m, **gate_up_options,
                                **opts)
    down = functools.partial(grouped_gemm_ws.aligned_gemm_w8a8_quantized, block_m=block_m, **down_options, **opts)
    w13, s13, w2, s2 = experts

    def over_layers(xq, xs, groups, w13, s13, w2, s2, both=True):
        def one(total, layer):
            act, act_scale = gate_up(xq, xs, groups, w13, s13, layer=layer)
            out = down(act, act_scale, groups, w2, s2, layer=layer) if both else act
            return total + out[:, :8].astype(jnp.float32).sum(), None
        return jax.lax.scan(one, jnp.float32(0), jnp.arange(layers))[0]

    act, act_scale = jax.jit(gate_up)(*rows, groups, w13, s13, layer=0)
    out = np.asarray(jax.jit(down)(act, act_scale, groups, w2, s2, layer=0), np.float32)[dest]
    operands = (*rows, groups, *experts)
    both = median_time(jax.jit(over_layers), *operands, warmup=1, iters=iters) / layers
    alone = median_time(jax.jit(functools.partial(over_layers, both=False)), *operands, warmup=1, iters=iters) / layers
    return out, both, alone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1212],
                   help="tokens of the step (W1 DEP4 gathers 4 x 303; one GPU of 256 requests: 256)")
    p.add_argument("--local-experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--variants", nargs="+", metavar="TEXT", help="run only the variants whose names contain one of "
                   "these (the first variant always runs: the others are checked against it)")
    args = p.parse_args()
    local, h, i = args.local_experts, args.hidden, args.intermediate
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    experts = (*random_fp8_experts(keys[0], (args.layers, local, 2 * i, h)),
               *random_fp8_experts(keys[1], (args.layers, local, h, i)))
    floor_bytes = (experts[0].nbytes + experts[2].nbytes) / args.layers
    bandwidth = copy_bandwidth(*copy_case((1 << 30) if not INTERPRET else (1 << 20)))
    variants = {name: v for name, v in VARIANTS.items()
                if not args.variants or name == next(iter(VARIANTS)) or any(t in name for t in args.variants)}
    if INTERPRET:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    opts = dict(interpret=InterpretGPUParams(), num_blocks=2) if INTERPRET else {}
    table = []
    for tokens in args.tokens:
        sizes, xq, xs = local_rows(tokens, local, h, keys[2])
        first = None
        for name, variant in variants.items():
            try:
                out, both, alone = run_variant(variant, sizes, xq, xs, experts, layers=args.layers, iters=args.iters,
                                               opts=opts)
            except Exception as e:  # noqa: BLE001 - a variant that does not lower is reported, the rest go on
                print(f"{tokens} tokens, {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            err = 0.0 if first is None else float(np.abs(out - first).max() / np.abs(first).max())
            first = out if first is None else first
            table.append((tokens, xq.shape[0], name, both, alone, err))
            print(f"{tokens} tokens ({xq.shape[0]} local rows), {name}: {both * 1e6:.0f} us/layer "
                  f"(gate/up {alone * 1e6:.0f}, down {(both - alone) * 1e6:.0f}), {floor_bytes / both / 1e12:.2f} TB/s "
                  f"of weights, max error vs the first {err:.1e}", flush=True)
    floor = floor_bytes / bandwidth
    print(f"\n{local} local experts of {h} x {i}: {floor_bytes / 1e6:.0f} MB of FP8 weights a layer; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, floor {floor * 1e6:.0f} us a layer")
    print(f"{'tokens':>6} {'rows':>6} {'variant':<36} {'us/layer':>9} {'gate/up':>8} {'down':>6} {'floor':>6} "
          f"{'err':>8}")
    for tokens, m, name, both, alone, err in table:
        print(f"{tokens:>6} {m:>6} {name:<36} {both * 1e6:>9.0f} {alone * 1e6:>8.0f} {(both - alone) * 1e6:>6.0f} "
              f"{floor / both:>6.0%} {err:>8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
