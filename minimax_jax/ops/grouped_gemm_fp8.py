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

Rows are first laid out group-aligned: each group starts at a multiple of `block_m` in a padded
buffer (XLA gathers them there and gathers the results back). Every tile then holds rows of one
group only, so at decode (a few rows per expert) each expert's weights are read once, tiles load
and store whole blocks, and no row-ragged stores are needed.
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


def aligned_layout(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array, int]:
    """Where each of the m sorted rows goes in the group-aligned buffer (m_padded for rows past
    the groups), the group of each block of that buffer, and the buffer's static row count."""
    sizes = group_sizes.astype(jnp.int32)
    g = sizes.shape[0]
    padded = -(-sizes // block_m) * block_m
    start, padded_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    m_padded = (-(-m // block_m) + g) * block_m          # >= m + g * (block_m - 1)
    r = jnp.arange(m, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), r, side="right"), g - 1)
    dest = jnp.where(r < jnp.sum(sizes), padded_start[group] + r - start[group], m_padded)
    block_start = jnp.arange(m_padded // block_m, dtype=jnp.int32) * block_m
    block_group = jnp.searchsorted(jnp.cumsum(padded), block_start, side="right").astype(jnp.int32)
    return dest.astype(jnp.int32), block_group, m_padded     # block_group == g: no rows


def grouped_gemm_fp8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array, *,
                     block_m: int = 64, max_concurrent_steps: int = 2, chunk_rows: int = 64,
                     load_layout: str | None = None, prefetch_scale: bool = False, swap_ab: bool = False,
                     double_buffer: bool = False, warp_specialized: bool = False, num_blocks: int | None = None,
                     interpret=None) -> jax.Array:
    """`reference` as a Mosaic-GPU kernel (rows past the groups come back 0). Needs N and K
    multiples of 128.

    block_m: rows per tile (a multiple of 64, wgmma's M; of 8 with swap_ab); chunk_rows: weight rows converted at
    once; load_layout: register layout of the loaded FP8 chunk (a plgpu.Layout name, or None to
    leave it to layout inference); num_blocks: thread blocks of the persistent grid. The
    defaults (two blocks per SM, two pipeline stages so that both fit in shared memory) were as
    fast or faster than one block of four stages at every decode size measured (runs S, T);
    prefetch_scale: each step's weight scale is loaded one step ahead instead of on demand;
    swap_ab: the weight tile is wgmma's A operand (M = 128 output channels) and the rows its N,
    which may be as few as 8, so block_m can be 16 or 32 where experts have few rows (decode)
    and the padded rows read and multiplied shrink with it. Both are exact under the
    interpreter and lowered for CUDA here, and off until measured on a GPU.

    double_buffer: two conversion buffers, so that a step's wgmma runs on while the next step
    converts (wgmma_wait(1), the copies released a step late); warp_specialized: `_kernel_ws`
    instead (block_m rows per tile, up to 256; the other options do not apply). Neither was
    faster than the defaults across sizes on an H200 (docs/benchmarks.md, runs AK-AM), so both
    are off: the call's fixed costs, not the work on rows, dominate at decode sizes."""
    _check_shapes(x, w, scale)
    if warp_specialized:
        kernel = functools.partial(_kernel_ws, w8a8=False)
        return _on_aligned_rows(kernel, x, w, scale, group_sizes, block_m, max_concurrent_steps,
                                num_blocks or sm_count(), interpret, swap_ab=True)
    if double_buffer and (swap_ab or prefetch_scale):
        raise ValueError("double_buffer goes with neither swap_ab nor prefetch_scale")
    kernel = functools.partial(_kernel, chunk_rows=chunk_rows, load_layout=load_layout,
                               prefetch_scale=prefetch_scale, swap_ab=swap_ab, double_buffer=double_buffer)
    return _on_aligned_rows(kernel, x, w, scale, group_sizes, block_m, max_concurrent_steps,
                            num_blocks or 2 * sm_count(), interpret, swap_ab=swap_ab)


def reference_w8a8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`reference` on the rows as `grouped_gemm_w8a8` sees them: e4m3 with one scale per row."""
    xq, xs = fp8.quantize_per_channel(x)
    return reference(fp8.dequantize_per_channel(xq, xs, x.dtype), w, scale, group_sizes)


def grouped_gemm_w8a8(x: jax.Array, w: jax.Array, scale: jax.Array, group_sizes: jax.Array, *,
                      block_m: int = 64, max_concurrent_steps: int = 4, prefetch_scale: bool = False,
                      swap_ab: bool = False, warp_specialized: bool = False, num_blocks: int | None = None,
                      interpret=None) -> jax.Array:
    """`reference_w8a8` as a Mosaic-GPU kernel: FP8 x FP8 wgmma per 128-deep step, scaled by the
    weight block's scale and summed in fp32 registers; the row scales apply to the output.
    Options as `grouped_gemm_fp8` (warp_specialized: block_m up to 128)."""
    _check_shapes(x, w, scale)
    xq, xs = fp8.quantize_per_channel(x)
    if warp_specialized:
        kernel = functools.partial(_kernel_ws, w8a8=True)
        swap_ab, num_blocks = True, num_blocks or sm_count()
    else:
        kernel = functools.partial(_kernel_w8a8, prefetch_scale=prefetch_scale, swap_ab=swap_ab)
        num_blocks = num_blocks or 2 * sm_count()
    out = _on_aligned_rows(kernel, xq, w, scale, group_sizes, block_m, max_concurrent_steps,
                           num_blocks, interpret, out_dtype=jnp.float32, swap_ab=swap_ab)
    return (out * xs).astype(x.dtype)


def sm_count() -> int:
    """Streaming multiprocessors of the first device (132 on an H100 or H200 where the device
    does not say), the unit of the kernels' persistent grid."""
    return getattr(jax.devices()[0], "core_count", 0) or 132


def _check_shapes(x, w, scale):
    m, k = x.shape
    g, n, k2 = w.shape
    if k != k2 or n % BLOCK or k % BLOCK or scale.shape != (g, n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8 grouped GEMM needs x [M, K], w [G, N, K], scale [G, N/128, K/128] "
                         f"with N, K multiples of 128; got {x.shape}, {w.shape}, {scale.shape}")


def _on_aligned_rows(make_kernel, x, w, scale, group_sizes, block_m, max_concurrent_steps, num_blocks,
                     interpret, out_dtype=None, swap_ab=False):
    """Gathers the rows into the group-aligned buffer, runs the kernel, gathers them back (the
    kernel writes [N, rows] with swap_ab)."""
    (m, k), (g, n, _) = x.shape, w.shape
    dest, block_group, m_padded = aligned_layout(group_sizes, m, block_m)
    # Materialised once: fused into the row copies, XLA recomputed this index arithmetic (the
    # searchsorted and cumsums) for every element copied, 0.7 ms per layer at a DEP4 decode step.
    dest, block_group = jax.lax.optimization_barrier((dest, block_group))
    source = jnp.full((m_padded,), m, jnp.int32).at[dest].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    x_aligned = jnp.take(x, source, axis=0, mode="fill", fill_value=0)    # a gather: no zeroed buffer
    kernel = make_kernel(m_padded, n, k, g, out_dtype or x.dtype, block_m, max_concurrent_steps,
                         num_blocks=num_blocks, interpret=interpret)
    out = kernel(block_group, x_aligned, w, scale)
    out = out.T if swap_ab else out
    return jnp.take(out, dest, axis=0, mode="fill", fill_value=0)         # dest == m_padded: past the groups


def _persistent_tiles(m_padded, n, g, dtype, block_m, num_blocks, interpret, swap_ab, tile_product):
    """What both kernels share: a persistent loop over the (row block, 128 columns) tiles of the
    group-aligned rows, skipping row blocks of no group; tile_product(x_gmem, w_gmem, s_gmem,
    group, mi, ni) gives a tile's fp32 value ([128, block_m] with swap_ab), which is stored
    through shared memory."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    grid_m, grid_n = m_padded // block_m, n // BLOCK

    def body(group_ref, x_gmem, w_gmem, s_gmem, o_gmem):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def tile(info):
            mi, ni = info.index[0] // grid_n, info.index[0] % grid_n     # a row block's N tiles together
            group = group_ref[mi]

            @pl.when(group < g)
            def _():
                value = tile_product(x_gmem, w_gmem, s_gmem, group, mi, ni)

                rows, cols = pl.ds(mi * block_m, block_m), pl.ds(ni * BLOCK, BLOCK)

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(value.shape, o_gmem.dtype))
                def _(o_smem):
                    o_smem[...] = value.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[(cols, rows) if swap_ab else (rows, cols)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_shape = (n, m_padded) if swap_ab else (m_padded, n)
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(out_shape, dtype), grid=(num_blocks,), grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)


def _k_pipeline(step, k, block_m, mi, ni, max_concurrent_steps, init_carry, delay_release=0):
    """Runs step over the 128-deep slices of one tile's rows and weights (copies pipelined;
    delay_release=1 keeps each step's slices until the next step ends, for a wgmma still
    reading them)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.emit_pipeline(
        step, grid=(k // BLOCK,),
        in_specs=[plgpu.BlockSpec((block_m, BLOCK), lambda kk: (mi, kk), delay_release=delay_release),
                  plgpu.BlockSpec((BLOCK, BLOCK), lambda kk: (ni, kk), delay_release=delay_release)],
        max_concurrent_steps=max_concurrent_steps, init_carry=init_carry)


def _kernel(m_padded, n, k, g, dtype, block_m, max_concurrent_steps, *, chunk_rows, load_layout,
            prefetch_scale, swap_ab, double_buffer, num_blocks, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    steps_k = k // BLOCK

    def convert(w_smem, s, w_bf16):
        """One FP8 weight tile to scaled bf16 in w_bf16, returned as wgmma's B operand (or as its
        A operand, untransposed, with swap_ab)."""
        for r in range(0, BLOCK, chunk_rows):      # bounds the registers in use
            chunk = w_smem[pl.ds(r, chunk_rows), :]
            if load_layout is not None and not interpret:
                chunk = plgpu.layout_cast(chunk, getattr(plgpu.Layout, load_layout))
            chunk = (chunk.astype(jnp.float32) * s).astype(jnp.bfloat16)
            if interpret and not swap_ab:   # the interpreter's wgmma takes no transposed operand
                w_bf16[:, pl.ds(r, chunk_rows)] = chunk.T
            else:
                w_bf16[pl.ds(r, chunk_rows), :] = chunk
        plgpu.commit_smem()
        return w_bf16 if interpret or swap_ab else _transposed(w_bf16)

    def tile_product(x_gmem, w_gmem, s_gmem, group, mi, ni):
        def pipeline(acc_ref, w_bf16, *x_t):
            def step(idx, x_smem, w_smem, *scale):
                s = scale[0] if prefetch_scale else s_gmem[group, ni, idx[0]]
                # double_buffer: this step converts into the buffer the step before last read,
                # and leaves its wgmma running while the next step converts into the other
                w_tile = convert(w_smem, s, w_bf16.at[idx[0] % 2] if double_buffer else w_bf16)
                if swap_ab:
                    plgpu.wgmma(acc_ref, w_tile, _transposed_operand(x_smem, x_t, interpret))
                else:
                    plgpu.wgmma(acc_ref, x_smem, w_tile)
                plgpu.wgmma_wait(1 if double_buffer else 0)
                if prefetch_scale:      # loaded one step ahead, carried to the next step
                    return s_gmem[group, ni, jnp.minimum(idx[0] + 1, steps_k - 1)]

            first_scale = s_gmem[group, ni, 0] if prefetch_scale else None
            _k_pipeline(step, k, block_m, mi, ni, max_concurrent_steps, first_scale,
                        delay_release=int(double_buffer))(x_gmem, w_gmem.at[group])
            if double_buffer:
                plgpu.wgmma_wait(0)
            return acc_ref[...]

        scratch = [plgpu.SMEM((2, BLOCK, BLOCK) if double_buffer else (BLOCK, BLOCK), jnp.bfloat16)]
        if swap_ab:
            scratch += _transpose_scratch((BLOCK, block_m), jnp.bfloat16, interpret)
        acc_shape = (BLOCK, block_m) if swap_ab else (block_m, BLOCK)
        return pl.run_scoped(     # register and shared-memory scopes may not mix
            lambda *refs: pl.run_scoped(lambda acc_ref: pipeline(acc_ref, *refs), plgpu.ACC(acc_shape)), *scratch)

    return _persistent_tiles(m_padded, n, g, dtype, block_m, num_blocks, interpret, swap_ab, tile_product)


def _kernel_w8a8(m_padded, n, k, g, dtype, block_m, max_concurrent_steps, *, prefetch_scale, swap_ab,
                 num_blocks, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    steps_k = k // BLOCK
    acc_shape = (BLOCK, block_m) if swap_ab else (block_m, BLOCK)

    def tile_product(x_gmem, w_gmem, s_gmem, group, mi, ni):
        def step(idx, x_smem, w_smem, carry):
            total, *scale = carry if prefetch_scale else (carry,)
            if prefetch_scale:     # the next step's scale is loaded while this step's wgmma runs
                scale.append(s_gmem[group, ni, jnp.minimum(idx[0] + 1, steps_k - 1)])

            def product(acc_ref, *scratch):
                if swap_ab:
                    plgpu.wgmma(acc_ref, w_smem, _transposed_operand(x_smem, scratch, interpret))
                else:
                    plgpu.wgmma(acc_ref, x_smem, _transposed_operand(w_smem, scratch, interpret))
                return acc_ref[...]

            transposed = x_smem if swap_ab else w_smem
            scratch = _transpose_scratch(transposed.shape[::-1], transposed.dtype, interpret)
            p = pl.run_scoped(lambda *refs: pl.run_scoped(lambda acc: product(acc, *refs),
                                                          plgpu.ACC(acc_shape)), *scratch)
            if prefetch_scale:
                return total + p * scale[0], scale[1]
            return total + p * s_gmem[group, ni, idx[0]]

        zeros = jnp.zeros(acc_shape, jnp.float32)
        if not interpret:
            zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
        init = (zeros, s_gmem[group, ni, 0]) if prefetch_scale else zeros
        out = _k_pipeline(step, k, block_m, mi, ni, max_concurrent_steps, init)(x_gmem, w_gmem.at[group])
        return out[0] if prefetch_scale else out

    return _persistent_tiles(m_padded, n, g, dtype, block_m, num_blocks, interpret, swap_ab, tile_product)


def _kernel_ws(m_padded, n, k, g, dtype, block_m, max_concurrent_steps, *, w8a8, num_blocks, interpret):
    """Warp-specialised: per thread block a memory warpgroup streams each tile's 128-deep slices
    of rows and weights through a ring of shared-memory stages, and two compute warpgroups take
    64 output channels each of the tile's 128. The weight slice is wgmma's A operand: converted
    from FP8 in registers (times its block scale, rounded to bf16, no shared-memory round trip)
    or, with w8a8, read as FP8 from shared memory against FP8 rows and scaled in registers after
    each step. The rows are the B operand (N = block_m). Output is [N, m_padded]."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    steps_k, grid_m, grid_n = k // BLOCK, m_padded // block_m, n // BLOCK
    row_bits = 8 if w8a8 else 16
    out_bits = jnp.dtype(dtype).itemsize * 8

    def transforms(row_bytes, bits):
        swizzle = plgpu.find_swizzle(row_bytes * 8)
        return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)

    def get_pipeline(step, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps_k,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            in_specs=[plgpu.BlockSpec((block_m, BLOCK), lambda kk: (0, kk),
                                      transforms=transforms(BLOCK * row_bits // 8, row_bits)),
                      plgpu.BlockSpec((BLOCK, BLOCK), lambda kk: (0, kk), transforms=transforms(BLOCK, 8))],
            max_concurrent_steps=max_concurrent_steps, compute_context=compute_context)

    def body(group_ref, x_gmem, w_gmem, s_gmem, o_gmem, o_smem, *interpret_scratch):
        def slices(mi, ni, group):
            return (x_gmem.at[pl.ds(mi * block_m, block_m)], w_gmem.at[group, pl.ds(ni * BLOCK, BLOCK)])

        ignore = lambda *_, **__: None      # noqa: E731 (allocations do not depend on the bodies)

        @functools.partial(pl.run_scoped, collective_axes="wg",
                           allocations=get_pipeline(ignore, ignore).get_allocations(*slices(0, 0, 0)))
        def _(allocations):
            wg = lax.axis_index("wg")
            channels = pl.ds(wg * 64, 64)

            @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
            def _(info):
                mi, ni = info.index[0] // grid_n, info.index[0] % grid_n    # a row block's N tiles together
                group = group_ref[mi]

                def weights_times_rows(acc_ref, x_smem, w_smem, s):
                    if w8a8:
                        a = w_smem.at[channels]
                    else:
                        a = (w_smem[channels, :].astype(jnp.float32) * s).astype(jnp.bfloat16)
                    if interpret:   # the interpreter's wgmma takes its A operand from shared memory only
                        a_smem, x_t = interpret_scratch
                        a_smem[wg] = a[...]
                        a, scratch = a_smem.at[wg], [x_t.at[wg]]
                    else:
                        scratch = []
                    plgpu.wgmma(acc_ref, a, _transposed_operand(x_smem, scratch, interpret))
                    plgpu.wgmma_wait(0)

                def step(idx, x_smem, w_smem, carry):
                    s = s_gmem[group, ni, idx[0]]
                    if not w8a8:
                        weights_times_rows(carry, x_smem, w_smem, s)
                        return carry

                    def product(acc_ref):
                        weights_times_rows(acc_ref, x_smem, w_smem, s)
                        return acc_ref[...]
                    return carry + pl.run_scoped(product, plgpu.ACC((64, block_m))) * s

                def compute_context(run_pipeline):
                    def store(value):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the previous tile's store
                        o_smem[wg] = value.astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[pl.ds(ni * BLOCK + wg * 64, 64),
                                                                         pl.ds(mi * block_m, block_m)])
                    if w8a8:
                        zeros = jnp.zeros((64, block_m), jnp.float32)
                        store(run_pipeline(zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)))
                    else:
                        pl.run_scoped(lambda acc_ref: store(run_pipeline(acc_ref)[...]),
                                      plgpu.ACC((64, block_m)))

                @pl.when(group < g)
                def _():
                    get_pipeline(step, compute_context)(*slices(mi, ni, group), allocations=allocations)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    scratch = [plgpu.SMEM((2, 64, block_m), dtype, transforms=transforms(block_m * out_bits // 8, out_bits))]
    if interpret:
        operand_dtype = jnp.float8_e4m3fn if w8a8 else jnp.bfloat16
        scratch += [plgpu.SMEM((2, 64, BLOCK), operand_dtype), plgpu.SMEM((2, BLOCK, block_m), operand_dtype)]
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((n, m_padded), dtype), grid=(num_blocks,), grid_names=("sm",),
        num_threads=3, thread_name="wg", scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)


def _transpose_scratch(shape, dtype, interpret):
    """Scratch for `_transposed_operand`: needed under the interpreter only."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return [plgpu.SMEM(tuple(shape), dtype)] if interpret else []


def _transposed_operand(ref, scratch, interpret):
    """A [R, K] shared-memory tile as a [K, R] wgmma operand: a transposed view, or under the
    interpreter, whose wgmma takes no transposed operand, a transposed copy in scratch."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if interpret:
        scratch[0][...] = ref[...].T
        return scratch[0]
    return plgpu.transpose_ref(ref, (1, 0))


def _transposed(ref):
    """[N, K] scratch as the [K, N] wgmma operand. plgpu.transpose_ref asks a plain scoped ref
    for its memory space, which newer jax refuses; the transform itself is the same."""
    from jax._src.state import types as state_types
    if not isinstance(ref, state_types.TransformedRef):
        ref = state_types.TransformedRef(ref, ())
    return ref.transpose((1, 0))
