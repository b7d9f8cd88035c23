"""Rows of a grouped GEMM laid out group-aligned: each group's rows start on a block of block_m
rows in a padded buffer, so every tile of block_m rows belongs to one group and a kernel reads
that group's weights for the whole tile (the kernels of grouped_gemm_fp8 and grouped_gemm_ws
take rows this way). Rows between the groups are zero; blocks past the groups belong to none.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def layout(group_sizes: jax.Array, m: int, block_m: int,
           row_group: jax.Array | None = None) -> tuple[jax.Array, jax.Array, int]:
    """Where each of m rows sorted by group goes in the aligned buffer (m_padded for rows past
    the groups), the group of each block of that buffer (len(group_sizes): no rows), and the
    buffer's static row count. row_group: each row's group where the caller knows it (any value
    for rows past the groups); otherwise it is searched for.

    Every search compares against all group boundaries at once (`compare_all`): the default
    binary search is a loop, which XLA runs as a kernel launch or more per halving on GPUs; for
    the rows that is m x groups comparisons (0.1 ms a layer at a DEP4 prefill step, run BH), which
    row_group saves. The indices are materialised: fused into the row copies, XLA recomputed
    this arithmetic for every element copied (0.7 ms per layer at a DEP4 decode step)."""
    sizes = group_sizes.astype(jnp.int32)
    g = sizes.shape[0]
    padded = -(-sizes // block_m) * block_m
    end, padded_end = jnp.cumsum(sizes), jnp.cumsum(padded)
    start, padded_start = end - sizes, padded_end - padded
    m_padded = padded_rows(m, g, block_m)
    r = jnp.arange(m, dtype=jnp.int32)
    if row_group is None:
        row_group = jnp.searchsorted(end, r, side="right", method="compare_all")
    group = jnp.clip(row_group.astype(jnp.int32), 0, g - 1)
    dest = jnp.where(r < end[-1], padded_start[group] + r - start[group], m_padded).astype(jnp.int32)
    block_start = jnp.arange(m_padded // block_m, dtype=jnp.int32) * block_m
    block_group = jnp.searchsorted(padded_end, block_start, side="right", method="compare_all").astype(jnp.int32)
    dest, block_group = jax.lax.optimization_barrier((dest, block_group))
    return dest, block_group, m_padded


def padded_rows(m: int, groups: int, block_m: int) -> int:
    """Rows of the aligned buffer for m rows in `groups` groups: room for each group's last
    partial block (>= m + groups * (block_m - 1)). The layout of fewer rows is a prefix of the
    layout of more: the same destinations and block groups up to its own padded_rows."""
    return (-(-m // block_m) + groups) * block_m


def sources(values: jax.Array, dest: jax.Array, m_padded: int, fill: int) -> jax.Array:
    """[m_padded] int32: values[r] at dest[r] (rows past the groups dropped), fill elsewhere.
    With the sorted rows' source indices as values it is what a gather into the aligned buffer
    reads (a gather needs no zeroed buffer, unlike a scatter of the rows themselves)."""
    return jnp.full((m_padded,), fill, jnp.int32).at[dest].set(values.astype(jnp.int32), mode="drop")


def on_aligned_rows(gemm: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, group_sizes: jax.Array,
                    block_m: int) -> jax.Array:
    """gemm(x_aligned, block_group) on x's rows (contiguous by group) laid out group-aligned,
    the result gathered back to x's rows (rows past the groups come back 0)."""
    m = x.shape[0]
    dest, block_group, m_padded = layout(group_sizes, m, block_m)
    x_aligned = jnp.take(x, sources(jnp.arange(m), dest, m_padded, fill=m), axis=0, mode="fill", fill_value=0)
    return jnp.take(gemm(x_aligned, block_group), dest, axis=0, mode="fill", fill_value=0)
