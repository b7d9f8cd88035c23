"""The router's fp32 product [tokens, 3072] @ [3072, 256] in several forms, on one device:

    python benchmarks/router_probe.py [--tokens 1212 8192 32768] [--choice]

Forms: XLA's default precision (TF32 on GPUs), `Precision.HIGHEST` (an fp32 GEMM), the 3-pass
bf16 dot algorithm (`BF16_BF16_F32_X3`), and `model.fp32_product` (one bf16 GEMM against three
exact bf16 parts of the weights, what the router runs). Each is timed over 16 stacked layers in
one jitted scan (us a layer) and checked against float64: the largest difference over the sum of
absolute products, and the share of tokens whose top 8 (scores plus a bias) differ from
float64's.

--choice times instead what follows the product: the top 8 of 256 experts by sigmoid plus bias and
their renormalised weights, XLA's (a sort of each row, then gathers) against
`ops.routing.choose_many` in several blocks of rows and warps, on the device timeline, each
checked against XLA's choice.
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.fp8_linear_probe import device_seconds  # noqa: E402
from minimax_jax.model import fp32_product, project  # noqa: E402
from minimax_jax.ops import routing  # noqa: E402
from scripts.bench import median_time  # noqa: E402

FORMS = {"default (TF32 on GPUs)": lambda x, w: project(x.astype(jnp.float32), w),
         "HIGHEST": lambda x, w: project(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST),
         "BF16_BF16_F32_X3": lambda x, w: jnp.dot(x.astype(jnp.float32), w,
                                                  precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3),
         "three bf16 parts": fp32_product}


def top8(logits: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.sort(np.argsort(-(1 / (1 + np.exp(-logits)) + bias), axis=1)[:, :8], axis=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1212, 8192, 32768])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--choice", action="store_true", help="time the choice after the product instead")
    args = p.parse_args()
    if args.choice:
        return time_choices(args)
    rng = np.random.RandomState(0)
    w = jnp.asarray(rng.standard_normal((3072, 256)) * 0.02, jnp.float32)
    bias = rng.standard_normal(256) * 1e-3
    stacked = jnp.stack([w * (1 + 0.01 * i) for i in range(args.layers)])
    rows = []
    for n in args.tokens:
        x = jnp.asarray(rng.standard_normal((n, 3072)), jnp.bfloat16)
        x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
        want, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)
        for name, form in FORMS.items():
            got = np.asarray(jax.jit(form)(x, w), np.float64)
            scan = jax.jit(lambda x, ws, form=form: jax.lax.scan(
                lambda c, wl: (c + form(x, wl)[:, :8].sum(), None), 0.0, ws)[0])
            seconds = median_time(scan, x, stacked) / args.layers
            other = np.mean(np.any(top8(got, bias) != top8(want, bias), axis=1))
            rows.append((n, name, seconds, np.max(np.abs(got - want) / scale), other))
    print(f"{'tokens':>6} {'form':<24} {'us/layer':>9} {'max err':>9} {'other top-8':>12}")
    for n, name, seconds, err, other in rows:
        print(f"{n:>6} {name:<24} {seconds * 1e6:>9.1f} {err:>9.1e} {other:>12.2%}")
    return 0


def xla_choice(logits, bias, layer, valid, top_k=8, scaling=2.5):
    scores = jax.nn.sigmoid(logits)
    _, ids = jax.lax.top_k(scores + bias[layer], top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True) * scaling
    keep = valid[:, None]
    return jnp.where(keep, ids, logits.shape[-1]), jnp.where(keep, weights, 0.0)


def time_choices(args) -> int:
    rng = np.random.RandomState(1)
    bias = jnp.asarray(rng.standard_normal((args.layers, 256)) * 1e-3, jnp.float32)
    forms = {"xla (sort)": xla_choice}
    for rows, warps in [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8)]:
        forms[f"kernel {rows} rows, {warps} warps"] = functools.partial(
            routing.choose_many, top_k=8, scaling=2.5, block_rows=rows, num_warps=warps)
    print(f"{'tokens':>6} {'form':<26} {'us/call':>8} {'ids equal':>10} {'max w diff':>11}")
    for n in args.tokens:
        logits = jnp.asarray(rng.standard_normal((n, 256)) * 2, jnp.float32)
        valid = jnp.arange(n) % 97 != 5
        want_ids, want_w = jax.jit(xla_choice)(logits, bias, 0, valid)
        for name, form in forms.items():
            f = jax.jit(lambda x, b, v, layer, form=form: form(x, b, layer, v))
            ids, w = f(logits, bias, valid, jnp.int32(0))
            seconds = device_seconds(f, (logits, bias, valid), args)
            print(f"{n:>6} {name:<26} {seconds * 1e6:>8.1f} {np.mean(np.asarray(ids) == np.asarray(want_ids)):>10.4f} "
                  f"{np.max(np.abs(np.asarray(w) - np.asarray(want_w))):>11.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
