"""Grouped GEMM with FP8 block-scaled weights, dequantised inside the kernel (weight-only).

The experts of the released checkpoint are float8_e4m3fn with one fp32 scale per 128x128 block.
Dequantising a whole layer to bf16 in XLA before a bf16 grouped GEMM reads the weights three
times (fp8 in, bf16 out, bf16 in again); this kernel reads the fp8 bytes once. Each 128x128
weight tile is one scale block, so a tile is converted in registers (exactly, e4m3 -> f16 ->
f32), multiplied by its scale, rounded to bf16 (the same numbers as `quant.fp8.dequantize_blockwise`)
and stored to shared memory for the Hopper wgmma.

Tiles follow the groups: tile t covers up to `block_m` rows of one group starting at that group's
own offset, so at decode (a few rows per expert) each expert's weights are read once instead of
once per global row block that its rows straddle. The tile table is built in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from quant import fp8

BLOCK = 128          # the checkpoint's scale block; also the kernel's N and K tile


def reference(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] bf16; w [G, N, K] e4m3 (rows = output channels); scale [G, N/128, K/128] fp32.
    Rows of group g (contiguous, in order) multiply dequantised w[g]; rows past the groups are 0."""
    wd = fp8.dequantize_blockwise(w, scale, x.dtype)
    return jax.lax.ragged_dot(x, wd.transpose(0, 2, 1), group_sizes,
                              preferred_element_type=jnp.float32).astype(x.dtype)


def group_tiles(group_sizes: jax.Array, block_m: int, num_tiles: int) -> tuple[jax.Array, ...]:
    """(group, first row, rows) of each tile; tiles past the last hold 0 rows."""
    sizes = group_sizes.astype(jnp.int32)
    tiles_per_group = -(-sizes // block_m)
    tile_end = jnp.cumsum(tiles_per_group)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    within = t - (tile_end[group] - tiles_per_group[group])
    first_row = jnp.cumsum(sizes)[group] - sizes[group] + within * block_m
    rows = jnp.where(t < tile_end[-1], jnp.clip(sizes[group] - within * block_m, 0, block_m), 0)
    return group, first_row.astype(jnp.int32), rows.astype(jnp.int32)


def num_tiles_bound(m: int, num_groups: int, block_m: int) -> int:
    return m // block_m + num_groups


def grouped_gemm_fp8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array, *,
                     block_m: int = 64, max_concurrent_steps: int = 4, chunk_rows: int = 64,
                     load_layout: str | None = "WGMMA", num_sms: int | None = None,
                     interpret=None) -> jax.Array:
    """Mosaic-GPU kernel with the semantics of `reference`, except that rows past the groups
    are left unwritten (callers mask them). Needs N and K multiples of 128.

    block_m: rows per tile (a multiple of 64, wgmma's M); chunk_rows: weight rows converted at
    once; load_layout: register layout of the loaded FP8 chunk (a plgpu.Layout name, or None to
    leave it to layout inference)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = x.shape
    g, n, k2 = w.shape
    if k != k2 or n % BLOCK or k % BLOCK or scale.shape != (g, n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8 grouped GEMM needs x [M, K], w [G, N, K], scale [G, N/128, K/128] "
                         f"with N, K multiples of 128; got {x.shape}, {w.shape}, {scale.shape}")
    num_tiles = num_tiles_bound(m, g, block_m)
    tile_group, tile_row, tile_rows = group_tiles(group_sizes, block_m, num_tiles)
    # a tile may start anywhere: pad so every [first_row, first_row + block_m) slice is in bounds
    x_padded = jnp.pad(x, ((0, block_m), (0, 0)))
    grid_n, steps_k = n // BLOCK, k // BLOCK
    if num_sms is None:
        num_sms = getattr(jax.devices()[0], "core_count", 132) or 132

    def body(group_ref, row_ref, rows_ref, x_gmem, w_gmem, s_gmem, o_gmem):
        @plgpu.nd_loop((num_tiles * grid_n,), collective_axes="sm")
        def tile(info):
            t, ni = info.index[0] // grid_n, info.index[0] % grid_n
            group, first_row, rows = group_ref[t], row_ref[t], rows_ref[t]

            @pl.when(rows > 0)
            def _():
                def pipeline(acc_ref, w_bf16):
                    def step(idx, x_smem, w_smem):
                        s = s_gmem[group, ni, idx[0]]
                        for r in range(0, BLOCK, chunk_rows):      # bounds the registers in use
                            chunk = w_smem[pl.ds(r, chunk_rows), :]
                            if load_layout is not None and not interpret:
                                chunk = plgpu.layout_cast(chunk, getattr(plgpu.Layout, load_layout))
                            chunk = (chunk.astype(jnp.float32) * s).astype(jnp.bfloat16)
                            if interpret:   # the interpreter's wgmma takes no transposed operand
                                w_bf16[:, pl.ds(r, chunk_rows)] = chunk.T
                            else:
                                w_bf16[pl.ds(r, chunk_rows), :] = chunk
                        plgpu.commit_smem()
                        b = w_bf16 if interpret else _transposed(w_bf16)
                        plgpu.wgmma(acc_ref, x_smem, b)
                        plgpu.wgmma_wait(0)

                    plgpu.emit_pipeline(
                        step, grid=(steps_k,),
                        in_specs=[plgpu.BlockSpec((pl.Element(block_m), BLOCK), lambda kk: (first_row, kk)),
                                  plgpu.BlockSpec((BLOCK, BLOCK), lambda kk: (ni, kk))],
                        max_concurrent_steps=max_concurrent_steps,
                    )(x_gmem, w_gmem.at[group])
                    return acc_ref[...]

                acc = pl.run_scoped(     # register and shared-memory scopes may not mix
                    lambda w_bf16: pl.run_scoped(lambda acc_ref: pipeline(acc_ref, w_bf16),
                                                 plgpu.ACC((block_m, BLOCK))),
                    plgpu.SMEM((BLOCK, BLOCK), jnp.bfloat16))
                _store_rows(acc, o_gmem, first_row, rows, ni, block_m, pl, plgpu)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(num_sms,), grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)
    return kernel(tile_group, tile_row, tile_rows, x_padded, w, scale)


def _store_rows(acc, o_gmem, first_row, rows, ni, block_m, pl, plgpu) -> None:
    """Writes the first `rows` rows of the tile: TMA boxes have static shapes, so the count is
    split into powers of two, each stored by its own box when its bit is set."""
    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, BLOCK), o_gmem.dtype))
    def _(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        size = block_m
        while size >= 1:
            offset = rows - (rows & (2 * size - 1))     # the larger boxes' rows come first

            @pl.when(rows & size != 0)
            def _():
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(offset, size)],
                    o_gmem.at[pl.ds(first_row + offset, size), pl.ds(ni * BLOCK, BLOCK)])
            size //= 2
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _transposed(ref):
    """[N, K] scratch as the [K, N] wgmma operand. plgpu.transpose_ref asks a plain scoped ref
    for its memory space, which newer jax refuses; the transform itself is the same."""
    from jax._src.state import types as state_types
    return state_types.TransformedRef(ref, ()).transpose((1, 0))
