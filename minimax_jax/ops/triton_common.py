"""What the Pallas (Triton) kernels here share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DOT_MIN_ROWS = 16        # a Triton dot's smallest M (and N): fewer rows are padded to it


def power_of_two(n: int) -> bool:
    """Whether n is a size Triton takes for a block dimension."""
    return n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def whole_block(shape: tuple[int, ...]):
    """A Pallas BlockSpec that hands every program the whole array of this shape."""
    from jax.experimental import pallas as pl
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def offsets_wrap(array: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether a kernel would read `array` at wrapped addresses: Pallas's Triton lowering computes
    element offsets in signed 32 bits for arrays of at most 4 GiB, so one of more than 2**31
    entries but at most 4 GiB (8-bit entries only) is read at negative offsets (illegal-address
    faults on an H200, docs/benchmarks.md run BS). Larger arrays get 64-bit offsets."""
    entries = math.prod(array.shape)
    return entries > 2**31 and entries * jnp.dtype(array.dtype).itemsize <= 2**32


def k_splits(k_blocks: int) -> int:
    """Programs over K for a decode-size product of k_blocks 128-wide blocks: 4 when K is long
    (at least 12 blocks, a multiple of 4), else 1. One request's projections and expert pairs on
    an H200 (benchmarks/fp8_linear_probe.py, docs/benchmarks.md run CE): 4 splits took qkv on TP2
    (24 blocks) 17.1 -> 12.1 us and TP4's o (12 blocks) 12.0 -> 9.7 us; a pair's down product on
    TP2 (6 blocks) was slower split in 2 (10.3 against 9.0 us)."""
    return 4 if k_blocks >= 12 and k_blocks % 4 == 0 else 1
