"""Grouped GEMM with FP8 block-scaled weights, dequantised inside the kernel (weight-only).

The experts of the released checkpoint are float8_e4m3fn with one fp32 scale per 128x128 block.
Dequantising a whole layer to bf16 in XLA before a bf16 grouped GEMM reads the weights three
times (fp8 in, bf16 out, bf16 in again); this kernel reads the fp8 bytes once. Each 128x128
weight tile is one scale block, so a tile is converted in registers (exactly, e4m3 -> f32),
multiplied by its scale, rounded to bf16 (the same numbers as `quant.fp8.dequantize_blockwise`)
and stored to shared memory for the Hopper wgmma.

`grouped_gemm_w8a8` is the block-scaled W8A8 form (what sglang runs for this checkpoint): the
rows are quantised to e4m3 with one scale per row, both operands enter an FP8 wgmma unconverted,
and each 128-deep partial product is scaled by its weight block's scale in registers. It reads
the same bytes with no conversion work; its numbers differ from the weight-only kernel by the
rows' FP8 rounding.

The kernels take rows laid out group-aligned: each group starts at a multiple of `block_m` in a
padded buffer (`ops.aligned_rows`; XLA gathers the rows there). Every tile then holds rows of one
group only, so at decode (a few rows per expert) each expert's weights are read once, tiles load
and store whole blocks, and no row-ragged stores are needed. `grouped_gemm_fp8` and
`grouped_gemm_w8a8` take rows contiguous by group and gather them there and back;
`ops.moe.routed_experts` lays a layer's rows out once for both of its GEMMs instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimax_jax.ops.aligned_rows import on_aligned_rows
from minimax_jax.ops.mosaic_common import sm_count, stacked_layers, transpose_scratch, transposed_operand
from quant import fp8

BLOCK = 128          # the checkpoint's scale block; also the kernel's N and K tile


def reference(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] bf16; w [G, N, K] e4m3 (rows = output channels); scale [G, N/128, K/128] fp32.
    Rows of group g (contiguous, in order) multiply dequantised w[g]; rows past the groups are 0."""
    wd = fp8.dequantize_blockwise(w, scale, x.dtype)
    return jax.lax.ragged_dot(x, wd.transpose(0, 2, 1), group_sizes,
                              preferred_element_type=jnp.float32).astype(x.dtype)


def grouped_gemm_fp8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array, *,
                     block_m: int = 64, **options) -> jax.Array:
    """`reference` as a Mosaic-GPU kernel (rows past the groups come back 0): the rows laid out
    group-aligned, then `aligned_gemm_fp8` (its options). Needs N and K multiples of 128."""
    gemm = functools.partial(aligned_gemm_fp8, w=w, scale=scale, block_m=block_m, **options)
    return on_aligned_rows(gemm, x, group_sizes, block_m)


def aligned_gemm_fp8(x_aligned: jax.Array, block_group: jax.Array, w: jax.Array, scale: jax.Array, *,
                     layer: jax.Array | int | None = None, block_m: int = 64, max_concurrent_steps: int = 2,
                     chunk_rows: int = 64, load_layout: str | None = None, num_blocks: int | None = None,
                     interpret=None) -> jax.Array:
    """The weight-only kernel on rows already group-aligned: x_aligned [m_padded, K] (see
    `aligned_rows.layout`), block_group [m_padded / block_m]. Returns [m_padded, N]; blocks of no
    group are left unwritten.

    block_m: rows per tile (a multiple of 64, wgmma's M); chunk_rows: weight rows converted at
    once; load_layout: register layout of the loaded FP8 chunk (a plgpu.Layout name, or None to
    leave it to layout inference); num_blocks: thread blocks of the persistent grid. The
    defaults (two blocks per SM, two pipeline stages so that both fit in shared memory) were as
    fast or faster than one block of four stages at every decode size measured (runs S, T), and
    than a prefetched scale, swapped operands, two conversion buffers and a warp-specialised
    form (runs V, W, AK-AM; those options were removed).

    layer: w [L, G, N, K] and scale [L, G, N/128, K/128] hold every layer's experts and the
    kernel reads this layer's in place: XLA copied a layer's slice whole before handing it to
    the kernel (0.86 ms a layer at W1's DEP4 decode step, docs/benchmarks.md run BH)."""
    w, scale, layer = stacked_layers(w, scale, layer)
    _check_shapes(x_aligned, w, scale, block_group, block_m)
    kernel = _kernel(x_aligned.shape[0], w.shape[2], w.shape[3], w.shape[1], x_aligned.dtype, block_m,
                     max_concurrent_steps, chunk_rows=chunk_rows, load_layout=load_layout,
                     num_blocks=num_blocks or 2 * sm_count(), interpret=interpret)
    return kernel(block_group, layer, x_aligned, w, scale)


def reference_w8a8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`reference` on the rows as `grouped_gemm_w8a8` sees them: e4m3 with one scale per row."""
    xq, xs = fp8.quantize_per_channel(x)
    return reference(fp8.dequantize_per_channel(xq, xs, x.dtype), w, scale, group_sizes)


def grouped_gemm_w8a8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array, *,
                      block_m: int = 64, **options) -> jax.Array:
    """`reference_w8a8` as a Mosaic-GPU kernel: `aligned_gemm_w8a8` on the group-aligned rows."""
    gemm = functools.partial(aligned_gemm_w8a8, w=w, scale=scale, block_m=block_m, **options)
    return on_aligned_rows(gemm, x, group_sizes, block_m)


def aligned_gemm_w8a8(x_aligned: jax.Array, block_group: jax.Array, w: jax.Array, scale: jax.Array, *,
                      layer: jax.Array | int | None = None, block_m: int = 64, max_concurrent_steps: int = 4,
                      num_blocks: int | None = None, interpret=None) -> jax.Array:
    """The W8A8 kernel on group-aligned rows (as `aligned_gemm_fp8`, layer included): the rows
    are quantised to e4m3 with one scale per row, each 128-deep FP8 x FP8 wgmma is scaled by its
    weight block's scale and summed in fp32 registers, and the row scales apply to the output."""
    w, scale, layer = stacked_layers(w, scale, layer)
    _check_shapes(x_aligned, w, scale, block_group, block_m)
    xq, xs = fp8.quantize_per_channel(x_aligned)
    kernel = _kernel_w8a8(x_aligned.shape[0], w.shape[2], w.shape[3], w.shape[1], jnp.float32, block_m,
                          max_concurrent_steps, num_blocks=num_blocks or 2 * sm_count(), interpret=interpret)
    return (kernel(block_group, layer, xq, w, scale) * xs).astype(x_aligned.dtype)


def _check_shapes(x, w, scale, block_group, block_m):
    m, k = x.shape
    layers, g, n, k2 = w.shape if w.ndim == 4 else (0,) * 4
    if not layers or k != k2 or n % BLOCK or k % BLOCK or scale.shape != (layers, g, n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8 grouped GEMM needs x [M, K], w [(L,) G, N, K], scale [(L,) G, N/128, K/128] "
                         f"with N, K multiples of 128; got {x.shape}, {w.shape}, {scale.shape}")
    if m % block_m or block_group.shape != (m // block_m,):
        raise ValueError(f"group-aligned rows need a multiple of block_m={block_m} rows and one group "
                         f"per block; got {m} rows and block_group {block_group.shape}")


def _persistent_tiles(m_padded, n, g, dtype, block_m, num_blocks, interpret, tile_product):
    """What both kernels share: a persistent loop over the (row block, 128 columns) tiles of the
    group-aligned rows, skipping row blocks of no group; tile_product(x_gmem, w_gmem, s_gmem,
    layer, group, mi, ni) gives a tile's fp32 value, which is stored through shared memory."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    grid_m, grid_n = m_padded // block_m, n // BLOCK

    def body(group_ref, layer_ref, x_gmem, w_gmem, s_gmem, o_gmem):
        layer = layer_ref[0]

        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def tile(info):
            mi, ni = info.index[0] // grid_n, info.index[0] % grid_n     # a row block's N tiles together
            group = group_ref[mi]

            @pl.when(group < g)
            def _():
                value = tile_product(x_gmem, w_gmem, s_gmem, layer, group, mi, ni)

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(value.shape, o_gmem.dtype))
                def _(o_smem):
                    o_smem[...] = value.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * block_m, block_m), pl.ds(ni * BLOCK, BLOCK)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m_padded, n), dtype), grid=(num_blocks,), grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)


def _k_pipeline(step, k, block_m, mi, ni, max_concurrent_steps, init_carry):
    """Runs step over the 128-deep slices of one tile's rows and weights (copies pipelined)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.emit_pipeline(
        step, grid=(k // BLOCK,),
        in_specs=[plgpu.BlockSpec((block_m, BLOCK), lambda kk: (mi, kk)),
                  plgpu.BlockSpec((BLOCK, BLOCK), lambda kk: (ni, kk))],
        max_concurrent_steps=max_concurrent_steps, init_carry=init_carry)


def _kernel(m_padded, n, k, g, dtype, block_m, max_concurrent_steps, *, chunk_rows, load_layout,
            num_blocks, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def convert(w_smem, s, w_bf16):
        """One FP8 weight tile to scaled bf16 in w_bf16, returned as wgmma's B operand."""
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
        return w_bf16 if interpret else _transposed(w_bf16)

    def tile_product(x_gmem, w_gmem, s_gmem, layer, group, mi, ni):
        def pipeline(acc_ref, w_bf16):
            def step(idx, x_smem, w_smem):
                plgpu.wgmma(acc_ref, x_smem, convert(w_smem, s_gmem[layer, group, ni, idx[0]], w_bf16))
                plgpu.wgmma_wait(0)

            _k_pipeline(step, k, block_m, mi, ni, max_concurrent_steps, None)(x_gmem, w_gmem.at[layer, group])
            return acc_ref[...]

        return pl.run_scoped(     # register and shared-memory scopes may not mix
            lambda w_bf16: pl.run_scoped(lambda acc_ref: pipeline(acc_ref, w_bf16), plgpu.ACC((block_m, BLOCK))),
            plgpu.SMEM((BLOCK, BLOCK), jnp.bfloat16))

    return _persistent_tiles(m_padded, n, g, dtype, block_m, num_blocks, interpret, tile_product)


def _kernel_w8a8(m_padded, n, k, g, dtype, block_m, max_concurrent_steps, *, num_blocks, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    acc_shape = (block_m, BLOCK)

    def tile_product(x_gmem, w_gmem, s_gmem, layer, group, mi, ni):
        def step(idx, x_smem, w_smem, total):
            def product(acc_ref, *scratch):
                plgpu.wgmma(acc_ref, x_smem, transposed_operand(w_smem, scratch, interpret))
                return acc_ref[...]

            scratch = transpose_scratch(w_smem.shape[::-1], w_smem.dtype, interpret)
            p = pl.run_scoped(lambda *refs: pl.run_scoped(lambda acc: product(acc, *refs),
                                                          plgpu.ACC(acc_shape)), *scratch)
            return total + p * s_gmem[layer, group, ni, idx[0]]

        zeros = jnp.zeros(acc_shape, jnp.float32)
        if not interpret:
            zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
        return _k_pipeline(step, k, block_m, mi, ni, max_concurrent_steps, zeros)(x_gmem, w_gmem.at[layer, group])

    return _persistent_tiles(m_padded, n, g, dtype, block_m, num_blocks, interpret, tile_product)


def _transposed(ref):
    """[N, K] scratch as the [K, N] wgmma operand. plgpu.transpose_ref asks a plain scoped ref
    for its memory space, which newer jax refuses; the transform itself is the same."""
    from jax._src.state import types as state_types
    if not isinstance(ref, state_types.TransformedRef):
        ref = state_types.TransformedRef(ref, ())
    return ref.transpose((1, 0))
