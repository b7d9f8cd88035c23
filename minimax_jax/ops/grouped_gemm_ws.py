"""Warp-specialised grouped GEMM on group-aligned rows (bf16), for prefill sizes.

Rows come laid out as `aligned_rows.layout` puts them (each expert's rows start on a
block of block_m), so every (row block, output columns) tile belongs to one expert, read from
`block_group`. Per thread block a memory warpgroup streams each tile's rows and weights through a
ring of shared-memory stages while two compute warpgroups each multiply the rows by half of the
tile's output columns: one warpgroup's wgmma runs while the other waits on its own, which a
single warpgroup per tile (the other grouped kernels here) cannot do.

Weights are [G, N, K] as checkpoints store them (rows = output channels): `aligned_gemm` takes
them in the compute dtype; `aligned_gemm_w8a8` takes the checkpoint's FP8 blocks as they are and
quantises the rows to FP8 with one scale per row and 128 columns (the checkpoint's dynamic
activation scheme, as sglang runs it), so both operands enter an FP8 wgmma and no layer is
dequantised per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimax_jax.ops.mosaic_common import sm_count, stacked_layers, swizzled, transpose_scratch, transposed_operand
from quant import fp8

SCALE_BLOCK = 128     # the FP8 checkpoint's scale block, along N and K of the weights
WG_ROWS = 64          # rows of one warpgroup's wgmma accumulator
SHARED_MEMORY = 227 * 1024    # bytes of shared memory a thread block may hold on Hopper


def aligned_gemm(x_aligned: jax.Array, block_group: jax.Array, w: jax.Array, *, block_m: int = 128,
                 block_n: int = 128, block_k: int = 64, max_concurrent_steps: int = 3,
                 num_blocks: int | None = None, interpret=None) -> jax.Array:
    """x_aligned [m_padded, K] @ w[group].T for each block of block_m rows -> [m_padded, N] in
    x's dtype; blocks of no group (block_group == G) are left unwritten. Each thread block's
    tile is block_m rows by 2 * block_n columns (block_n per compute warpgroup)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m_padded, k = x_aligned.shape
    g, n, k2 = w.shape
    tile_n = 2 * block_n
    if (k != k2 or m_padded % block_m or n % tile_n or k % block_k or block_m % 64
            or block_group.shape != (m_padded // block_m,) or w.dtype != x_aligned.dtype):
        raise ValueError(f"warp-specialised grouped GEMM needs x [M, K] with M a multiple of block_m={block_m} "
                         f"(itself of 64), w [G, N, K] of x's dtype with N a multiple of {tile_n} and K of "
                         f"{block_k}, one group per row block; got {x_aligned.shape} {x_aligned.dtype}, "
                         f"{w.shape} {w.dtype}, block_group {block_group.shape}")
    dtype = x_aligned.dtype
    grid_m, grid_n = m_padded // block_m, n // tile_n
    epilogue_rows = 64

    def get_pipeline(step, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(k // block_k,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            in_specs=[plgpu.BlockSpec((block_m, block_k), lambda kk: (0, kk), transforms=swizzled(block_k, dtype)),
                      plgpu.BlockSpec((tile_n, block_k), lambda kk: (0, kk), transforms=swizzled(block_k, dtype))],
            max_concurrent_steps=max_concurrent_steps, compute_context=compute_context)

    def body(group_ref, x_gmem, w_gmem, o_gmem, o_smem, *interpret_scratch):
        def slices(mi, ni, group):
            return x_gmem.at[pl.ds(mi * block_m, block_m)], w_gmem.at[group, pl.ds(ni * tile_n, tile_n)]

        def tile(wg, mi, ni, group):
            my_columns = pl.ds(wg * block_n, block_n)

            def step(idx, x_smem, w_smem, acc_ref):
                my_scratch = [ref.at[wg] for ref in interpret_scratch]
                plgpu.wgmma(acc_ref, x_smem, transposed_operand(w_smem.at[my_columns], my_scratch, interpret))
                plgpu.wgmma_wait(0)
                return acc_ref

            def compute_context(run_pipeline):
                def store(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    for half in range(block_m // epilogue_rows):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the slot's last store
                        o_smem[wg] = acc[half * epilogue_rows:(half + 1) * epilogue_rows].astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[wg], o_gmem.at[pl.ds(mi * block_m + half * epilogue_rows, epilogue_rows),
                                                     pl.ds(ni * tile_n + wg * block_n, block_n)])
                pl.run_scoped(store, plgpu.ACC((block_m, block_n)))
            return step, compute_context

        _over_tiles(get_pipeline, slices, tile, group_ref, g, grid_m, grid_n)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    scratch = [plgpu.SMEM((2, epilogue_rows, block_n), dtype, transforms=swizzled(block_n, dtype)),
               *transpose_scratch((2, block_k, block_n), dtype, interpret)]       # one per compute warpgroup
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m_padded, n), dtype), grid=(num_blocks or sm_count(),),
        grid_names=("sm",), num_threads=3, thread_name="wg", scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)
    return kernel(block_group.astype(jnp.int32), x_aligned, w)


def aligned_gemm_w8a8(x_aligned: jax.Array, block_group: jax.Array, w: jax.Array, w_scale: jax.Array, *,
                      layer: jax.Array | int | None = None, block_m: int = 128,
                      max_concurrent_steps: int | None = None, num_blocks: int | None = None,
                      interpret=None) -> jax.Array:
    """x_aligned [m_padded, K] (bf16, group-aligned rows) @ dequantised w[group].T -> [m_padded, N]
    in x's dtype, with w [G, N, K] float8_e4m3fn and w_scale [G, N/128, K/128] as the checkpoint
    stores them. The rows are rounded to FP8 per row and 128 columns (`quant.fp8.quantize_groups`;
    XLA fuses that into whatever produced the rows); each 128-deep FP8 wgmma is scaled by its
    row scales times its weight block's scale and summed in fp32 registers. Blocks of no group
    are left unwritten.

    Each compute warpgroup multiplies 64 rows by 128 columns. block_m=128: the two split a tile's
    rows (tiles of 128 x 128); block_m=64: its columns (tiles of 64 x 256), which reads each
    weight block for half the rows and so streams half the row bytes per weight byte from L2,
    for steps whose experts hold few rows each (decode; steps of 64 deep, which would fit more
    stages beside its 64 KiB of weights a step, measured slower, docs/benchmarks.md run DK).
    max_concurrent_steps: the pipeline's stages, by default as many as shared memory holds, up
    to 4.

    layer: w [L, G, N, K] and w_scale [L, G, N/128, K/128] hold every layer's experts and the
    kernel reads this layer's (a slice of the stacked weights passed into the row buckets' switch
    was copied first by XLA, docs/benchmarks.md run BE)."""
    xq, xs = fp8.quantize_groups(x_aligned, SCALE_BLOCK)
    return aligned_gemm_w8a8_quantized(xq, xs, block_group, w, w_scale, layer=layer, out_dtype=x_aligned.dtype,
                                       block_m=block_m, max_concurrent_steps=max_concurrent_steps,
                                       num_blocks=num_blocks, interpret=interpret)


def aligned_gemm_w8a8_quantized(xq: jax.Array, xs: jax.Array, block_group: jax.Array, w: jax.Array,
                                w_scale: jax.Array, *, layer: jax.Array | int | None = None,
                                out_dtype=jnp.bfloat16, block_m: int = 128,
                                max_concurrent_steps: int | None = None, num_blocks: int | None = None,
                                interpret=None) -> jax.Array:
    """`aligned_gemm_w8a8` on rows already rounded by `quant.fp8.quantize_groups`: xq [m_padded, K]
    float8_e4m3fn, xs [m_padded, K/128] float32. Rounding the tokens before they are gathered
    into the aligned rows reads each token once and gathers half the bytes."""
    return _w8a8_kernel(xq, xs, block_group, layer, w, w_scale, dtype=out_dtype, block_m=block_m,
                        max_concurrent_steps=max_concurrent_steps, num_blocks=num_blocks, interpret=interpret)


def aligned_gate_up_swiglu_w8a8(xq: jax.Array, xs: jax.Array, block_group: jax.Array, w13: jax.Array,
                                w13_scale: jax.Array, *, layer: jax.Array | int | None = None, block_m: int = 128,
                                halves_by_warpgroup: bool = False, max_concurrent_steps: int | None = None,
                                num_blocks: int | None = None, interpret=None) -> tuple[jax.Array, jax.Array]:
    """The gate/up GEMM of `aligned_gemm_w8a8_quantized` with SwiGLU and the next GEMM's rounding
    in its epilogue: w13 [(L,) G, 2I, K] (gate rows, then up rows). Each tile multiplies its rows
    by 128 gate and the matching 128 up columns, takes silu(gate) * up (both rounded to bf16 first,
    as the unfused GEMM's output is) to bf16, and rounds that to e4m3 with one scale per row: the
    128 columns are one scale group. Returns (act [m_padded, I] float8_e4m3fn, act_scale
    [m_padded, I/128] float32), the down GEMM's rows, without writing the gate/up product or
    reading it back.

    halves_by_warpgroup (block_m=64 only): tiles of 64 rows by 128 columns, one compute
    warpgroup multiplying them by the gate columns and the other by the up columns; the up
    warpgroup hands its product to the gate's through shared memory for SwiGLU. A step's weights
    are 32 KiB instead of 64 (tiles of 256 columns), so shared memory holds 4 stages instead of 2,
    at twice the row bytes per weight byte. `moe.fp8_matmuls` takes it for every tile of 64 rows:
    on an H200 the two kernels took 1018 against 1071 us a layer at 256 tokens over 256 experts,
    310 against 345 at 1212 tokens over 64, 370 against 393 at 2048 (docs/benchmarks.md, runs DO
    and DQ)."""
    return _w8a8_kernel(xq, xs, block_group, layer, w13, w13_scale, dtype=jnp.float8_e4m3fn, block_m=block_m,
                        max_concurrent_steps=max_concurrent_steps, num_blocks=num_blocks, interpret=interpret,
                        swiglu=True, halves_by_warpgroup=halves_by_warpgroup)


def _w8a8_kernel(xq, xs, block_group, layer, w, w_scale, *, dtype, block_m, max_concurrent_steps, num_blocks,
                 interpret, swiglu: bool = False, halves_by_warpgroup: bool = False):
    """Both W8A8 kernels: rows xq [M, K] with scales xs [M, K/128]; w [(L,) G, N, K] (layer: its
    index into L). swiglu: w's rows are gate then up; each tile takes 128 of each and its
    epilogue writes SwiGLU's output rounded to e4m3 ([M, N/2]) and the rows' scales
    ([M, N/2/128]); otherwise the product [M, N] in dtype. halves_by_warpgroup: see
    `aligned_gate_up_swiglu_w8a8`."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    w, w_scale, layer = stacked_layers(w, w_scale, layer)
    m_padded, k = xq.shape
    _, g, n, k2 = w.shape
    block = SCALE_BLOCK
    halves = 2 if swiglu else 1                  # weight tiles per output tile: gate and up
    n_out = n // halves
    row_groups = block_m // WG_ROWS              # 2: the compute warpgroups split a tile's rows; 1: its columns
    split = halves_by_warpgroup                  # or, with SwiGLU, its gate and up halves
    if split and (not swiglu or block_m != WG_ROWS):
        raise ValueError(f"halves by warpgroup are for the SwiGLU kernel's tiles of {WG_ROWS} rows (block_m {block_m})")
    tile_n = block if split else block * (2 // max(row_groups, 1))
    if (k != k2 or block_m not in (64, 128) or m_padded % block_m or n_out % tile_n or k % block
            or w.dtype != jnp.float8_e4m3fn or w_scale.shape != (w.shape[0], g, n // block, k // block)
            or block_group.shape != (m_padded // block_m,)):
        raise ValueError(f"W8A8 warp-specialised grouped GEMM needs block_m 64 or 128 (got {block_m}), x [M, K] with "
                         f"M a multiple of block_m, w [(L,) G, N, K] float8_e4m3fn with N a multiple of "
                         f"{tile_n * halves} (tiles of {tile_n} columns{', gate and up' if swiglu else ''}) and K "
                         f"of {block}, w_scale [(L,) G, N/{block}, K/{block}], one group per row block; got "
                         f"{xq.shape}, {w.shape} {w.dtype}, {w_scale.shape}, block_group {block_group.shape}")
    grid_m, grid_n = m_padded // block_m, n_out // tile_n
    fp8_tile = swizzled(block, jnp.float8_e4m3fn)
    exchange_bytes = WG_ROWS * block * 2 if split else 0             # the up product handed over in bf16
    stages = max_concurrent_steps or _stages_that_fit(
        block_m * (block + 4) + halves * tile_n * block,         # a step's FP8 rows, their scales, its weights
        2 * WG_ROWS * (block * jnp.dtype(dtype).itemsize + (4 if swiglu else 0)) + exchange_bytes)

    def get_pipeline(step, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(k // block,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            in_specs=[plgpu.BlockSpec((block_m, block), lambda kk: (0, kk), transforms=fp8_tile),
                      *[plgpu.BlockSpec((tile_n, block), lambda kk: (0, kk), transforms=fp8_tile)] * halves,
                      plgpu.BlockSpec((1, block_m), lambda kk: (kk, 0))],
            max_concurrent_steps=stages, compute_context=compute_context)

    def body(group_ref, layer_ref, x_gmem, xs_gmem, w_gmem, s_gmem, *outs_and_scratch):
        o_gmem, *outs_and_scratch = outs_and_scratch
        os_gmem = outs_and_scratch.pop(0) if swiglu else None
        o_smem, *outs_and_scratch = outs_and_scratch
        os_smem = outs_and_scratch.pop(0) if swiglu else None
        if split:
            exchange, up_ready, up_taken, *outs_and_scratch = outs_and_scratch
        interpret_scratch = outs_and_scratch
        layer = layer_ref[0]

        def slices(mi, ni, group):
            rows = pl.ds(mi * block_m, block_m)
            weights = [w_gmem.at[layer, group, pl.ds(h * n_out + ni * tile_n, tile_n)] for h in range(halves)]
            return x_gmem.at[rows], *weights, xs_gmem.at[:, rows]

        def tile(wg, mi, ni, group):
            row_part, col_part = (wg, 0) if row_groups == 2 else (0, 0) if split else (0, wg)
            my_rows = pl.ds(row_part * WG_ROWS, WG_ROWS)
            my_cols = pl.ds(col_part * block, block)
            out_rows = pl.ds(mi * block_m + row_part * WG_ROWS, WG_ROWS)
            col_block = ni * (tile_n // block) + col_part        # of this warpgroup's 128 output columns

            def step(idx, x_smem, *refs):
                *w_smems, xs_smem, totals = refs
                row_scale = xs_smem[0, my_rows]
                my_halves = [wg] if split else range(halves)       # split: 0 gate, 1 up

                def product(h, acc_ref):
                    my_scratch = [ref.at[wg] for ref in interpret_scratch]
                    for half, w_smem in enumerate(w_smems):     # the one of w_smems that h names
                        @pl.when(h == half)
                        def _():
                            plgpu.wgmma(acc_ref, x_smem.at[my_rows],
                                        transposed_operand(w_smem.at[my_cols], my_scratch, interpret))
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                new = []
                for h, total in zip(my_halves, totals):
                    weight_scale = s_gmem[layer, group, h * (n_out // block) + col_block, idx[0]]
                    p = pl.run_scoped(functools.partial(product, h), plgpu.ACC((WG_ROWS, block)))
                    new.append(total + p * lax.broadcast_in_dim(row_scale * weight_scale, p.shape, [0]))
                return tuple(new)

            def compute_context(run_pipeline):
                zeros = jnp.zeros((WG_ROWS, block), jnp.float32)
                if not interpret:
                    zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
                totals = run_pipeline((zeros,) * (1 if split else halves))
                if split:       # the gate warpgroup stores from slot 0
                    _swiglu_across_warpgroups(wg, totals[0], exchange, up_ready, up_taken,
                                              functools.partial(store, 0))
                elif swiglu:
                    store(wg, *_swiglu_rounded(*totals))
                else:
                    store(wg, totals[0].astype(dtype))

            def store(slot, out, scale=None):       # the tile's output, with SwiGLU its rows' scales
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)      # the slot's last store
                o_smem[slot] = out
                if scale is not None:
                    os_smem[slot] = scale
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[slot], o_gmem.at[out_rows, pl.ds(col_block * block, block)])
                if scale is not None:
                    plgpu.copy_smem_to_gmem(os_smem.at[slot], os_gmem.at[col_block, out_rows])
            return step, compute_context

        _over_tiles(get_pipeline, slices, tile, group_ref, g, grid_m, grid_n)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    scratch = [plgpu.SMEM((2, WG_ROWS, block), dtype, transforms=swizzled(block, dtype)),
               *([plgpu.SMEM((2, WG_ROWS), jnp.float32)] if swiglu else []),
               *([plgpu.SMEM((WG_ROWS, block), jnp.bfloat16, transforms=swizzled(block, jnp.bfloat16)),
                  plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1)] if split else []),
               *transpose_scratch((2, block, block), jnp.float8_e4m3fn, interpret)]
    out_type = jax.ShapeDtypeStruct((m_padded, n_out), dtype)
    if swiglu:
        out_type = (out_type, jax.ShapeDtypeStruct((n_out // block, m_padded), jnp.float32))
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=(num_blocks or sm_count(),),
        grid_names=("sm",), num_threads=3, thread_name="wg", scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)
    # the row scales and the output's scales lie transposed, so a tile's rows are contiguous
    out = kernel(block_group.astype(jnp.int32), layer, xq, xs.T, w, w_scale)
    return (out[0], out[1].T) if swiglu else out


def _swiglu_across_warpgroups(wg, product, exchange, up_ready, up_taken, store) -> None:
    """SwiGLU of a tile whose gate product is warpgroup 0's and up product warpgroup 1's: the up
    warpgroup writes its product, rounded to bf16 as the unfused GEMM's output is, to `exchange`
    and waits until the gate warpgroup has read it (so the next tile cannot overwrite it first);
    the gate warpgroup reads it and hands SwiGLU's rounded output to store(act, scale)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @pl.when(wg == 1)
    def _():
        exchange[...] = product.astype(jnp.bfloat16)
        plgpu.barrier_arrive(up_ready)
        plgpu.barrier_wait(up_taken)

    @pl.when(wg == 0)
    def _():
        plgpu.barrier_wait(up_ready)
        up = exchange[...]
        plgpu.barrier_arrive(up_taken)
        store(*_swiglu_rounded(product, up))


def _stages_that_fit(step_bytes: float, other_bytes: float, most: int = 4) -> int:
    """Pipeline stages of step_bytes each that shared memory holds beside other_bytes (the
    epilogue's buffers, and 1 KiB for barriers), up to `most`."""
    return int(max(1, min(most, (SHARED_MEMORY - other_bytes - 1024) // step_bytes)))


def _swiglu_rounded(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(gate) * up, each rounded as the unfused path rounds it (bf16 GEMM output, bf16
    activation), then to e4m3 with one scale per row (amax / 448, 1 for an all-zero row), as
    `quant.fp8.quantize_groups` rounds a group of 128 columns."""
    gate = gate.astype(jnp.bfloat16).astype(jnp.float32)
    up = up.astype(jnp.bfloat16).astype(jnp.float32)
    act = (gate / (1.0 + jnp.exp(-gate)) * up).astype(jnp.bfloat16).astype(jnp.float32)
    amax = jnp.max(jnp.abs(act), axis=1)
    scale = jnp.where(amax > 0, amax / fp8.E4M3_MAX, 1.0)
    q = act / jax.lax.broadcast_in_dim(scale, act.shape, [0])
    return jnp.clip(q, -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(jnp.float8_e4m3fn), scale


def _over_tiles(get_pipeline, slices, tile, group_ref, g: int, grid_m: int, grid_n: int) -> None:
    """The persistent loop both kernels run: the pipeline's shared memory allocated once for all
    warpgroups, then each SM walks (row block, column tile) pairs, a row block's tiles together,
    skipping row blocks of no group. tile(wg, mi, ni, group) gives the pipeline's step and
    compute context for one tile; slices(mi, ni, group) its operands in global memory."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ignore = lambda *_, **__: None      # noqa: E731 (allocations do not depend on the bodies)

    @functools.partial(pl.run_scoped, collective_axes="wg",
                       allocations=get_pipeline(ignore, ignore).get_allocations(*slices(0, 0, 0)))
    def _(allocations):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _(info):
            mi, ni = info.index[0] // grid_n, info.index[0] % grid_n
            group = group_ref[mi]

            @pl.when(group < g)
            def _():
                get_pipeline(*tile(wg, mi, ni, group))(*slices(mi, ni, group), allocations=allocations)
