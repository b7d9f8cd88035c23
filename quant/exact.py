"""Arithmetic that both number formats need rounded exactly once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def divide(a: jax.Array, b: ArrayLike) -> jax.Array:
    """a / b rounded once, as the reference implementations divide. Under jit XLA turns a division
    by a constant or a broadcast into a multiplication by the reciprocal (two roundings, so last-bit
    differences that can move a rounding tie); operands hidden behind a barrier keep the divide on
    CPUs. XLA's GPU compiler multiplies all the same: FP8 scales amax / 448 computed this way on an
    H200 were amax times fp32(1/448) in every group (docs/benchmarks.md, run GM)."""
    a, b = jax.lax.optimization_barrier(tuple(jnp.broadcast_arrays(a, jnp.asarray(b, a.dtype))))
    return a / b
