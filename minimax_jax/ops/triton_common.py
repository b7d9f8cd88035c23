"""What the Pallas (Triton) kernels here share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def offsets_wrap(array: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether a kernel would read `array` at wrapped addresses: Pallas's Triton lowering computes
    element offsets in signed 32 bits for arrays of at most 4 GiB, so one of more than 2**31
    entries but at most 4 GiB (8-bit entries only) is read at negative offsets (illegal-address
    faults on an H200, docs/benchmarks.md run BS). Larger arrays get 64-bit offsets."""
    entries = math.prod(array.shape)
    return entries > 2**31 and entries * jnp.dtype(array.dtype).itemsize <= 2**32
