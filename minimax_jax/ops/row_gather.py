"""Rows gathered into a group-aligned buffer as one Pallas (Triton) kernel on GPUs.

The grouped GEMMs take their rows in a buffer sized for the worst case (`aligned_rows`): at a
DEP4 decode step of W1 about 2400 local rows sit in a buffer of 17920 (every pair of the step,
plus a block of padding per local expert). XLA's gather writes every row of it, zeros where no
row goes: 55 MB a layer for 7 MB of rows, 66 us of a 430 us MoE block on an H200 (5 us as
this kernel; docs/benchmarks.md, run CQ). This kernel writes only the rows that have a source
and leaves the others as they are, which the GEMMs allow: each output row depends on its input
row alone, the kernels skip blocks past the groups, and the combine reads back only the pairs'
rows.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from minimax_jax.ops import triton_common

MAX_CHUNK = 1024        # columns a program moves per load
ROWS_PER_PROGRAM = 16   # the index's length must be a multiple of it


def supported(tables: Sequence[jax.Array], rows: int, segments: Sequence[tuple[int, int, int]] | None = None,
              rows_per_program: int = ROWS_PER_PROGRAM) -> bool:
    """Whether the kernel gathers `rows` rows from these tables, rows_per_program a program:
    rows a multiple of it, 2-D tables of one row count and of whole bytes, and no table or
    output it would offset wrongly (`triton_common.offsets_wrap`: an FP8 output of over 2**31
    entries, about 700k rows of 3072, is one that a prefill step's largest row bucket can
    reach)."""
    if rows % rows_per_program or not all(
            t.ndim == 2 and t.shape[0] == tables[0].shape[0] and jax.dtypes.itemsize_bits(t.dtype) >= 8 for t in tables):
        return False
    outputs = [jax.ShapeDtypeStruct((rows, width), tables[t].dtype) for t, _, width in _segments(tables, segments)]
    return not any(triton_common.offsets_wrap(a) for a in [*tables, *outputs])


def _segments(tables: Sequence[jax.Array], segments: Sequence[tuple[int, int, int]] | None) -> list:
    """The segments as given, or each table whole."""
    return list(segments) if segments is not None else [(t, 0, table.shape[1]) for t, table in enumerate(tables)]


def gather_rows(tables: Sequence[jax.Array], index: jax.Array, segments: Sequence[tuple[int, int, int]] | None = None,
                *, rows_per_program: int = ROWS_PER_PROGRAM, num_warps: int = 4,
                interpret: bool = False) -> list[jax.Array]:
    """For each segment (table number, first column, width): out[r] = table[index[r], first :
    first + width], [M, width] in the table's dtype, where index[r] is a row of the table
    (tables: [N, ...] 2-D, the same N). Rows whose index is outside [0, N) are not written:
    their contents are undefined. segments: default each table whole. One program moves
    rows_per_program rows of every segment."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    n = tables[0].shape[0]
    m = index.shape[0]
    segments = _segments(tables, segments)
    for t, first, width in segments:
        if not (0 <= t < len(tables) and 0 <= first and width > 0 and first + width <= tables[t].shape[1]):
            raise ValueError(f"segment {(t, first, width)} lies outside tables {[t.shape for t in tables]}")
    if not supported(tables, m, segments, rows_per_program):
        raise ValueError(f"gather_rows takes 2-D tables of one row count, tables and outputs of at most 2**31 "
                         f"entries or over 4 GiB, and an index a multiple of {rows_per_program} long; got "
                         f"{[(t.shape, str(t.dtype)) for t in tables]}, index {index.shape}")

    def kernel(index_ref, *refs):
        table_refs, out_refs = refs[:len(tables)], refs[len(tables):]
        rows = pl.program_id(0) * rows_per_program + jnp.arange(rows_per_program)
        source = index_ref[pl.ds(pl.program_id(0) * rows_per_program, rows_per_program)]
        valid = (source >= 0) & (source < n)
        source = jnp.where(valid, source, 0)
        for (t, first, width), out_ref in zip(segments, out_refs):
            chunk = min(MAX_CHUNK, triton_common.next_power_of_two(width))
            for start in range(0, width, chunk):
                cols = start + jnp.arange(chunk)
                mask = valid[:, None] & (cols < width)[None, :]
                values = pltriton.load(table_refs[t].at[source[:, None], first + cols[None, :]], mask=mask, other=0)
                pltriton.store(out_ref.at[rows[:, None], cols[None, :]], values, mask=mask)

    # Pallas's Triton lowering cannot fill a masked FP8 load: 8-bit floats move as bytes
    as_bytes = [jnp.issubdtype(t.dtype, jnp.floating) and jax.dtypes.itemsize_bits(t.dtype) == 8 for t in tables]
    words = [jax.lax.bitcast_convert_type(t, jnp.uint8) if b else t for t, b in zip(tables, as_bytes)]
    out = pl.pallas_call(
        kernel, grid=(m // rows_per_program,),
        out_shape=[jax.ShapeDtypeStruct((m, width), words[t].dtype) for t, _, width in segments],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="gather_rows",
    )(index.astype(jnp.int32), *words)
    return [jax.lax.bitcast_convert_type(o, tables[t].dtype) if as_bytes[t] else o
            for o, (t, _, _) in zip(out, segments)]


def reference(tables: Sequence[jax.Array], index: jax.Array,
              segments: Sequence[tuple[int, int, int]] | None = None) -> list[jax.Array]:
    """gather_rows as XLA gathers, zeros in the rows it leaves unwritten."""
    segments = _segments(tables, segments)
    taken = [jnp.take(table, index, axis=0, mode="fill", fill_value=0) for table in tables]
    return [taken[t][:, first:first + width] for t, first, width in segments]
