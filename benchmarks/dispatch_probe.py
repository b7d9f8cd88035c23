"""The arithmetic around the MoE dispatch's all-gather on one GPU, per layer, for each form the
hidden states travel in (`sharding.collectives.MeshComm.dispatch` with W8A8 experts):

    python benchmarks/dispatch_probe.py [--tokens 8192 303] [--ranks 2 4]

A rank holds --tokens tokens and gathers every rank's; the W8A8 experts then round every
gathered token to FP8 (per token and 128 columns) unless the tokens came as FP8 codes:
- bf16: nothing before the gather, the rounding of ranks x tokens after it;
- fp8: the rounding of the rank's own tokens before it, nothing after;
- fp4: NVFP4 quantisation of the rank's tokens before it, then the FP8 codes of ranks x tokens
  after it: straight from the NVFP4 codes in XLA (`quant.nvfp4.activations_to_fp8_groups`, the engine's
  path off GPUs), by Triton kernels (`minimax_jax.ops.nvfp4_tokens`, the engine's path on GPUs),
  or by dequantising and rounding (the path before run FR; each piece also alone).
The collective is not run (one GPU): each line gives the bytes a device receives, which over the
measured all-gather bandwidth of docs/benchmarks.md is its time. Device time per call from a
profiler trace; the variants that give the gathered tokens' FP8 codes, the fraction of them equal
to those of `quant.nvfp4.activations_to_fp8_groups` (the float32 values, rounded exactly).
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.fp8_linear_probe import device_seconds  # noqa: E402
from minimax_jax.ops import moe, nvfp4_tokens  # noqa: E402
from quant import nvfp4  # noqa: E402

HIDDEN = 3072
E2M1_VALUES = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


@contextlib.contextmanager
def decoding_by_table():
    """nvfp4.decode_e2m1 as a lookup in a 16-entry table while tracing (its form before the
    bit operations)."""
    by_bits = nvfp4.decode_e2m1
    nvfp4.decode_e2m1 = lambda codes: jnp.asarray(E2M1_VALUES)[(jnp.asarray(codes, jnp.uint8) & 0xF).astype(jnp.int32)]
    try:
        yield
    finally:
        nvfp4.decode_e2m1 = by_bits


def variants(hidden: int, interpret: bool):
    """name -> (fn(own tokens, gathered tokens, their payload, their global scales), the bytes a
    gathered token is received in[, a context to trace fn in])."""
    round_fp8 = moe.token_rounding("mosaic-ws-w8a8")
    dequantize = lambda p, g: nvfp4.dequantize_activations(p, g, hidden, jnp.bfloat16)  # noqa: E731
    fp4_bytes = nvfp4.activation_payload_width(hidden) + 4
    return {
        "bf16: round the gathered tokens": (lambda x, xs, p, g: round_fp8(xs), 2 * hidden),
        "fp8: round the own tokens": (lambda x, xs, p, g: round_fp8(x), hidden + 4 * hidden // 128),
        "fp4: quantise the own tokens": (lambda x, xs, p, g: nvfp4.quantize_activations(x), fp4_bytes),
        "fp4: dequantise the gathered tokens": (lambda x, xs, p, g: dequantize(p, g), fp4_bytes),
        "fp4: dequantise + round the gathered tokens": (lambda x, xs, p, g: round_fp8(dequantize(p, g)), fp4_bytes),
        "fp4: dequantise (table lookup) + round the gathered tokens": (
            lambda x, xs, p, g: round_fp8(dequantize(p, g)), fp4_bytes, decoding_by_table),
        "fp4: dequantise in fp32 + round the gathered tokens": (
            lambda x, xs, p, g: round_fp8(nvfp4.dequantize_activations(p, g, hidden, jnp.float32)), fp4_bytes),
        "fp4: quantise the own tokens, exact division": (
            lambda x, xs, p, g: nvfp4.quantize_activations(x, exact=True), fp4_bytes),   # the form before run FQ
        "fp4: FP8 groups straight from the gathered codes": (
            lambda x, xs, p, g: nvfp4.activations_to_fp8_groups(p, g, hidden), fp4_bytes),
        "fp4: FP8 groups from the codes by one kernel": (
            lambda x, xs, p, g: nvfp4_tokens.fp8_groups(p, g, hidden, interpret=interpret), fp4_bytes),
        "fp4: all of it (quantise, FP8 groups from the codes)": (
            lambda x, xs, p, g: (nvfp4.quantize_activations(x), nvfp4.activations_to_fp8_groups(p, g, hidden)),
            fp4_bytes),
        "fp4: quantise the own tokens by the kernel": (
            lambda x, xs, p, g: nvfp4_tokens.quantize(x, interpret=interpret), fp4_bytes),
        "fp4: all of it by the kernels": (
            lambda x, xs, p, g: (nvfp4_tokens.quantize(x, interpret=interpret),
                                 nvfp4_tokens.fp8_groups(p, g, hidden, interpret=interpret)), fp4_bytes),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 303], help="tokens a rank holds")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="ranks gathered from")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    args.layers = 1         # device_seconds cycles a layer index the variants ignore
    table = []
    for n in args.tokens:
        for ranks in args.ranks:
            key = jax.random.PRNGKey(n + ranks)
            gathered = (jax.random.normal(key, (ranks * n, args.hidden), jnp.float32)
                        * jnp.exp(jax.random.normal(key, (ranks * n, 1)))).astype(jnp.bfloat16)
            own = gathered[:n]
            payload, scales = jax.jit(nvfp4.quantize_activations)(gathered)
            arrays = (own, gathered, payload, scales)
            # FP8 codes of the float32 values, as the XLA form makes them: what the others are compared with
            reference = np.asarray(jax.jit(nvfp4.activations_to_fp8_groups, static_argnums=2)(
                payload, scales, args.hidden)[0].astype(jnp.float32))
            for name, (fn, per_token, *tracing) in variants(args.hidden, jax.default_backend() != "gpu").items():
                f = jax.jit(lambda x, xs, p, g, layer, fn=fn: fn(x, xs, p, g))
                with (tracing[0] if tracing else contextlib.nullcontext)():
                    out = jax.block_until_ready(f(*arrays, jnp.int32(0)))
                same = ""
                codes = out[-1][0] if isinstance(out, (tuple, list)) and isinstance(out[-1], (tuple, list)) else \
                    out[0] if isinstance(out, (tuple, list)) else out
                if name.startswith("fp4") and codes.dtype == jnp.float8_e4m3fn and codes.shape[0] > n:
                    same = f"{np.mean(np.asarray(codes.astype(jnp.float32)) == reference):.4f}"
                seconds = device_seconds(f, arrays, args) if jax.default_backend() == "gpu" else float("nan")
                received = (ranks - 1) * n * per_token
                table.append((n, ranks, name, seconds, received, same))
                print(f"{n} tokens x {ranks} ranks {name}: {seconds * 1e6:.1f} us", flush=True)
    print("\n| tokens a rank | ranks | variant | us a layer | MB received a layer | FP8 codes equal |\n"
          "|---|---|---|---|---|---|")
    for n, ranks, name, seconds, received, same in table:
        print(f"| {n} | {ranks} | {name} | {seconds * 1e6:.1f} | {received / 1e6:.1f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
