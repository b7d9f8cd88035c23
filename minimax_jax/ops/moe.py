"""Routed experts as a grouped GEMM.

Token-expert pairs are sorted by expert so each local expert's rows are contiguous, then two
grouped GEMMs run SwiGLU. Pairs whose expert lives elsewhere (expert parallelism) or that belong
to padding tokens sort past the last group and contribute exactly zero.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from minimax_jax.ops import (aligned_rows, grouped_gemm_fp8, grouped_gemm_nvfp4, grouped_gemm_ws, nvfp4_tokens,
                             pair_experts, row_gather)
from minimax_jax.ops.mosaic_common import stacked_layers
from quant import fp8, nvfp4


def ragged_dot_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


# measured best of five block shapes on an H200 at m = 512, 2048 and 32768 (docs/benchmarks.md)
MOSAIC_BLOCKS = dict(block_m=64, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def ragged_dot_mosaic(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                      transpose_rhs: bool = False) -> jax.Array:
    """Pallas Mosaic-GPU grouped GEMM (Hopper wgmma, TMA pipelines), bf16 in and out; w is
    [G, K, N], or [G, N, K] with transpose_rhs. Rows past the last group are left unwritten:
    callers mask them."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    n = w.shape[1] if transpose_rhs else w.shape[2]
    block_n = 256 if n % 256 == 0 else 128
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, block_n=block_n,
                                      transpose_rhs=transpose_rhs, **MOSAIC_BLOCKS)


KERNELS = ("auto", "xla", "xla-w8a8", "mosaic", "mosaic-ws", "mosaic-fp8", "mosaic-w8a8", "mosaic-ws-w8a8",
           "triton-nvfp4")
FP8_KERNELS = ("mosaic-fp8", "mosaic-w8a8", "mosaic-ws-w8a8", "xla-w8a8")
# kernels that read a layer's experts from the weights stacked over layers, in place
STACKED_KERNELS = ("mosaic-fp8", "mosaic-w8a8", "mosaic-ws-w8a8", "triton-nvfp4")


def on_hopper() -> bool:
    kind = jax.devices()[0].device_kind
    return jax.default_backend() == "gpu" and ("H100" in kind or "H200" in kind)


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"moe_kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


def resolve_kernel(kernel: str, expert_format: str, hidden: int, inter: int, dtype=jnp.bfloat16) -> str:
    """"xla" (lax.ragged_dot on weights in the compute dtype, the reference), "xla-w8a8" (the
    reference of the W8A8 kernels' numbers: FP8 experts and rows rounded as "mosaic-ws-w8a8"
    rounds them, multiplied in fp32), "mosaic" (the bf16 Mosaic-GPU grouped GEMM; FP8/NVFP4
    experts are dequantised in XLA first), "mosaic-fp8" (FP8 experts dequantised inside the
    kernel, weight-only, ops/grouped_gemm_fp8.py), "mosaic-w8a8" (FP8 experts against rows
    quantised to FP8 per row, one warpgroup; opt-in), "mosaic-ws" (FP8/NVFP4 experts dequantised
    in XLA, then the warp-specialised grouped GEMM on group-aligned rows, ops/grouped_gemm_ws.py),
    "mosaic-ws-w8a8" (FP8 experts as stored against rows rounded to FP8 per row and 128
    columns, the checkpoint's `activation_scheme: dynamic` as sglang runs it, in the
    warp-specialised form with SwiGLU in the gate/up kernel), "triton-nvfp4" (NVFP4 experts read
    in place, widened in the kernel, ops/grouped_gemm_nvfp4.py), or "auto": on a Hopper GPU
    computing in bf16 (lax.ragged_dot ran at 12 TFLOP/s on an H200) "mosaic-ws-w8a8" for FP8
    experts, "triton-nvfp4" for NVFP4 ones, "mosaic" for bf16; "xla" elsewhere (the Mosaic
    kernels take bf16 rows). "mosaic-ws-w8a8" was the fastest MoE block for FP8 experts at every size measured
    (64 local experts on an H200, device time, each pair from one call; docs/benchmarks.md runs
    BH, BI): 389 against 437 us for "mosaic-fp8" at 256 tokens (W2's DEP4 decode), 428 against
    487 at 1212 (W1's), 893 against 1744 at 8192, 2840 against 6213 at 32768 (W1's DEP4
    prefill step)."""
    check_kernel(kernel)
    block = grouped_gemm_fp8.BLOCK
    fp8_blocks = expert_format == "fp8" and hidden % block == 0 and inter % block == 0
    # the warp-specialised kernel's tiles: 256 output columns, 64-deep steps
    ws_shapes = hidden % 256 == 0 and (2 * inter) % 256 == 0 and inter % 64 == 0
    nvfp4_blocks = expert_format == "nvfp4" and hidden % 128 == 0 and inter % 128 == 0
    if kernel == "auto":
        kernel = "xla" if not (dtype == jnp.bfloat16 and on_hopper()) else (
            "mosaic-ws-w8a8" if fp8_blocks else "triton-nvfp4" if nvfp4_blocks else "mosaic")
    if kernel == "triton-nvfp4" and not nvfp4_blocks:
        raise ValueError(f"moe kernel triton-nvfp4 needs NVFP4 experts with hidden and intermediate sizes that are "
                         f"multiples of 128; got {expert_format}, {hidden}, {inter}")
    if kernel == "mosaic-ws" and not (expert_format in ("fp8", "nvfp4") and ws_shapes):
        raise ValueError(f"moe kernel mosaic-ws needs FP8 or NVFP4 experts (read as the checkpoint lays them "
                         f"out) with hidden and 2 x intermediate multiples of 256 and intermediate of 64; got "
                         f"{expert_format}, {hidden}, {inter}")
    if kernel in FP8_KERNELS and not fp8_blocks:
        if expert_format != "fp8":
            raise ValueError(f"moe kernel {kernel} needs FP8 experts, these are {expert_format}")
        raise ValueError(f"moe kernel {kernel} needs hidden and intermediate sizes that are "
                         f"multiples of {block}, got {hidden} and {inter}")
    return kernel


# kernels that round every token to FP8 (per row and 128 columns) before its rows are gathered
ROUNDING_KERNELS = ("mosaic-ws-w8a8", "xla-w8a8")


def token_rounding(kernel: str) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None:
    """How `kernel` rounds the layer's tokens before gathering them into rows: (FP8 codes
    [N, H], fp32 scales [N, H / 128]), or None for kernels that take the tokens as they are. The
    rounding is per token, so tokens rounded where they live and gathered as codes (half the
    bytes of bf16, `sharding.collectives.MeshComm.dispatch`) give the same rows."""
    if kernel not in ROUNDING_KERNELS:
        return None
    if kernel == "xla-w8a8":
        # the barrier keeps the FP8 codes: XLA's GPU compiler otherwise drops a conversion to FP8
        # and back as excess precision, and the reference would not round at all
        return lambda x: jax.lax.optimization_barrier(fp8.quantize_groups(x, grouped_gemm_ws.SCALE_BLOCK))
    return functools.partial(fp8.quantize_groups, group=grouped_gemm_ws.SCALE_BLOCK)


def nvfp4_dispatch_payload(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A device's tokens [N, H] as an NVFP4 dispatch sends them: (payload, global scales) of
    `quant.nvfp4.quantize_activations`, on GPUs by one kernel (`nvfp4_tokens.quantize`)."""
    if jax.default_backend() == "gpu":
        return nvfp4_tokens.quantize(h)
    return nvfp4.quantize_activations(h)


def nvfp4_dispatch_tokens(payload: jax.Array, global_scale: jax.Array, like: jax.Array, rounded: bool) -> Any:
    """Tokens of an NVFP4 dispatch as the experts take them: dequantised to like's dtype, or with
    rounded the W8A8 experts' FP8 codes and scales (`token_rounding`) of their float32 values,
    the dequantised values never written: on GPUs by one kernel (`nvfp4_tokens.fp8_groups`),
    elsewhere in XLA (`quant.nvfp4.activations_to_fp8_groups`, behind a barrier that keeps XLA
    from dropping the FP8 conversion as excess precision where an XLA reference widens the codes
    again)."""
    hidden = like.shape[-1]
    if not rounded:
        return nvfp4.dequantize_activations(payload, global_scale, hidden, like.dtype)
    if jax.default_backend() == "gpu":
        return nvfp4_tokens.fp8_groups(payload, global_scale, hidden, grouped_gemm_ws.SCALE_BLOCK)
    return jax.lax.optimization_barrier(
        nvfp4.activations_to_fp8_groups(payload, global_scale, hidden, grouped_gemm_ws.SCALE_BLOCK))


def row_capacities(pairs: int, local_share: float) -> tuple[int, ...]:
    """Static row counts the grouped GEMMs are compiled for, smallest first; the last is every
    pair. Under expert parallelism a device owns local_share of the experts, so about that share
    of the token-expert pairs is local: computing all pairs would spend most of the GEMM on rows
    that are thrown away (the Mosaic kernel computes every row block it is given). Small batches
    (decode) keep one capacity and no branch."""
    if local_share >= 1.0 or pairs < 16384:
        return (pairs,)
    caps = sorted({-(-int(pairs * local_share * f) // 256) * 256 for f in (1.25, 2.0)})
    return tuple(c for c in caps if c < pairs) + (pairs,)


RowsMatmul = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PackedTokens:
    """Tokens as a collective delivered them: [N, W] words of one or more arrays side by side
    (and maybe more columns after them), each array's word columns (first, width), and the
    function that takes those columns' rows ([n, width] each) back to the arrays. Rows are
    gathered from the words column by column, so nothing is sliced out of the whole: arrays
    sliced out first were copied whole before a row bucket's branch (a `wrapped_slice` kernel of
    0.1 ms a layer at W1's DEP4 prefill step, docs/benchmarks.md)."""
    packed: jax.Array
    columns: tuple[tuple[int, int], ...]
    from_columns: Callable[[list[jax.Array]], Any]

    def unpack(self, rows: jax.Array) -> Any:
        """The arrays of these rows of the words."""
        return self.from_columns([rows[:, first:first + width] for first, width in self.columns])


def _take_rows(tokens: Any, index: jax.Array) -> Any:
    """tokens' rows at index (an array, a pytree of them, or PackedTokens); out of range: zeros."""
    take = lambda a: jnp.take(a, index, axis=0, mode="fill", fill_value=0)  # noqa: E731
    if isinstance(tokens, PackedTokens):
        return tokens.unpack(take(tokens.packed))
    return jax.tree.map(take, tokens)


def kernel_gathers_rows() -> bool:
    """Whether the aligned rows are gathered by `row_gather`'s kernel (GPUs) rather than XLA."""
    return jax.default_backend() == "gpu"


def _gather_aligned_rows(tokens: Any, index: jax.Array) -> Any:
    """_take_rows into a group-aligned buffer, where rows with no source (index out of range)
    may hold anything: on GPUs one kernel writes only the rows that have one (`row_gather`)."""
    if isinstance(tokens, PackedTokens):
        tables, segments = [tokens.packed], [(0, first, width) for first, width in tokens.columns]
    else:
        tables, tree = jax.tree.flatten(tokens)
        segments = None
    if not (kernel_gathers_rows() and row_gather.supported(tables, index.shape[0], segments)):
        return _take_rows(tokens, index)
    columns = row_gather.gather_rows(tables, index, segments)
    return tokens.from_columns(columns) if isinstance(tokens, PackedTokens) else jax.tree.unflatten(tree, columns)


WS_BLOCK_ROWS = 128      # rows per tile of the warp-specialised kernel
# an expert's mean rows in a step up to which the W8A8 kernel's tiles take 64 rows: at 8 and 38
# (256 and 1212 tokens) the MoE block took 1040 against 1261 and 355 against 408 us a layer on
# an H200 (docs/benchmarks.md, run DI)
WS_W8A8_FEW_ROWS = 48


def ws_w8a8_block_rows(pairs: int, num_experts: int, intermediate: int, hidden: int) -> int:
    """Rows per tile of the W8A8 warp-specialised kernels for a step of `pairs` token-expert
    pairs over num_experts experts (intermediate: this device's share): 64 where an expert
    averages few rows (WS_W8A8_FEW_ROWS), the gate/up tile's gate and up halves each one compute
    warpgroup's (128 columns of intermediate) and the down tile's 256 columns of hidden split
    between them; otherwise 128, whose warpgroups split its rows. A tile of 128 rows streams a
    whole row block from L2 for every 128 columns of weights, mostly the zeros that pad an
    expert's few rows (TP4's experts, 384 columns of intermediate: 396 against 515 us a layer at
    256 tokens over 256 experts on an H200, docs/benchmarks.md run DR)."""
    few = pairs <= WS_W8A8_FEW_ROWS * num_experts
    return 64 if few and intermediate % 128 == 0 and hidden % 256 == 0 else WS_BLOCK_ROWS


@dataclasses.dataclass(frozen=True)
class GroupedMatmuls:
    """A layer's two grouped GEMMs over rows sorted by local expert: gate_up(rows, groups) gives
    [R, 2I] (gate columns first), down(rows, groups) gives [R, H].

    block_rows = 0: each group's rows are contiguous and `groups` are the group sizes.
    block_rows > 0: the rows are group-aligned (`aligned_rows.layout`: each group
    from a multiple of block_rows, zero rows between) and `groups` is each block's group; the
    layout is built once for both GEMMs, and the rows are gathered into it straight from the
    tokens.

    prepare(tokens), when given, runs once on the layer's tokens before they are gathered into
    rows; gate_up then gets the gathered result (any pytree of [N, ...] arrays), e.g. tokens
    rounded to FP8 with their scales. activates: gate_up applies SwiGLU itself and returns
    down's input (any pytree), e.g. the activation already rounded to FP8."""
    gate_up: RowsMatmul
    down: RowsMatmul
    block_rows: int = 0
    prepare: Callable[[jax.Array], Any] | None = None
    activates: bool = False


def routed_experts(x: Any, expert_ids: jax.Array, weights: jax.Array, num_local: int,
                   first_expert: jax.Array | int, matmuls: GroupedMatmuls, local_share: float = 1.0,
                   out_dtype=jnp.float32, prepared: bool = False) -> jax.Array:
    """Weighted sum over each token's routed experts among the local ones.

    x: [N, H], or with prepared what matmuls.prepare made of it (e.g. tokens rounded to FP8 before
    they were gathered from other devices), possibly still packed (PackedTokens). expert_ids,
    weights: [N, k] (global ids; an id outside [first_expert, first_expert + num_local)
    contributes nothing). local_share (local experts over all) sizes the row buckets
    (`row_capacities`): the GEMMs run on the smallest that holds every local pair, chosen on the
    device, so the result is exact whatever the routing. Returns
    [N, H] summed in fp32, in out_dtype (the combine's: converted inside the row buckets' branch,
    which then returns half the bytes).
    """
    n, k = expert_ids.shape
    local = expert_ids - first_expert
    mine = (local >= 0) & (local < num_local)
    flat = jnp.where(mine, local, num_local).reshape(-1)
    # local pairs first, by expert: each pair's row in that order (the combine gathers by it
    # instead of scatter-adding, whose float atomics on GPUs sum in no fixed order) and the pair
    # on each row
    sorted_position, group_sizes = _stable_sort_positions(flat, num_local + 1)
    group_sizes = group_sizes[:num_local]
    order = jnp.zeros(n * k, jnp.int32).at[sorted_position].set(jnp.arange(n * k, dtype=jnp.int32),
                                                               unique_indices=True)

    if prepared and matmuls.prepare is None:
        raise ValueError("prepared tokens given to grouped GEMMs that prepare none")
    tokens = matmuls.prepare(x) if matmuls.prepare and not prepared else x

    block = matmuls.block_rows
    if block:
        # the aligned layout of every pair, built before the row buckets' branch: a bucket's
        # layout is its prefix (each group starts where it would with fewer rows), so a branch
        # begins with its row gather. Built inside, its small kernels each waited for the host,
        # which launches a branch only once it has read the branch index (docs/benchmarks.md)
        dest, block_group, m_all = aligned_rows.layout(group_sizes, n * k, block, row_group=flat[order])
        source = aligned_rows.sources(order // k, dest, m_all, fill=n)
        pair_row = dest[sorted_position]                   # past the groups: m_all, gathers 0

    def combine(capacity: int) -> jax.Array:
        if block:
            m_padded = aligned_rows.padded_rows(capacity, num_local, block)
            rows, groups = _gather_aligned_rows(tokens, source[:m_padded]), block_group[:m_padded // block]
            row_of_pair = pair_row
        else:
            rows, groups = _take_rows(tokens, order[:capacity] // k), group_sizes
            row_of_pair = jnp.minimum(sorted_position, capacity - 1)
        act = matmuls.gate_up(rows, groups)
        if not matmuls.activates:
            inter = act.shape[-1] // 2
            # the rounding GEMMs' product dtype whether or not the tokens came rounded
            dtype = act.dtype if matmuls.prepare else x.dtype
            act = (jax.nn.silu(act[:, :inter].astype(jnp.float32)) * act[:, inter:].astype(jnp.float32)).astype(dtype)
        y = matmuls.down(act, groups)
        picked = jnp.take(y, row_of_pair, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        pair_out = jnp.where(mine.reshape(-1, 1), picked, 0.0)
        return jnp.sum(pair_out.reshape(n, k, -1) * weights[..., None].astype(jnp.float32), axis=1).astype(out_dtype)

    capacities = row_capacities(n * k, local_share)
    if len(capacities) == 1:
        return combine(capacities[0])
    bucket = jnp.sum(jnp.sum(group_sizes) > jnp.asarray(capacities[:-1]))
    return jax.lax.switch(bucket, [functools.partial(combine, c) for c in capacities])


def _stable_sort_positions(keys: jax.Array, num_keys: int) -> tuple[jax.Array, jax.Array]:
    """Where a stable sort puts each of keys (ints in [0, num_keys)), and each key's count: a
    counting sort (the keys before it, plus the equal keys before it), one pass over a
    [len(keys), num_keys] one-hot. XLA's sort of the ~10k pairs of a DEP4 decode step took 35 us
    a layer on an H200 (docs/benchmarks.md, run AN)."""
    one_hot = (keys[:, None] == jnp.arange(num_keys, dtype=keys.dtype)).astype(jnp.int32)
    equal_before = jnp.cumsum(one_hot, axis=0) - one_hot
    counts = jnp.sum(one_hot, axis=0)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.take_along_axis(equal_before, keys[:, None], axis=1)[:, 0]
    return (starts[keys] + rank).astype(jnp.int32), counts.astype(jnp.int32)


def weight_matmuls(w13: jax.Array, w2: jax.Array, kernel: str, output_major: bool = False,
                   **ws_options) -> GroupedMatmuls:
    """gate_up and down over weights in the compute dtype: w13 [E, H, 2I], w2 [E, I, H]; or with
    output_major as checkpoints store them (rows = output channels): w13 [E, 2I, H], w2 [E, H, I].
    Mosaic reads output-major weights as they lie: transposing a dequantised layer made XLA
    transpose the whole stacked FP8 weights once, outside the layer loop (35 GiB at full size).
    ws_options go to the mosaic-ws kernel."""
    if kernel == "mosaic-ws":
        if not output_major:
            raise ValueError("mosaic-ws reads weights as checkpoints store them (output_major)")
        gemm = functools.partial(grouped_gemm_ws.aligned_gemm, block_m=WS_BLOCK_ROWS, **ws_options)
        return GroupedMatmuls(lambda rows, groups: gemm(rows, groups, w13), lambda rows, groups: gemm(rows, groups, w2),
                              block_rows=WS_BLOCK_ROWS)
    if kernel == "mosaic":
        matmul = functools.partial(ragged_dot_mosaic, transpose_rhs=output_major)
    elif output_major:
        matmul = lambda rows, w, sizes: ragged_dot_reference(rows, w.transpose(0, 2, 1), sizes)  # noqa: E731
    else:
        matmul = ragged_dot_reference
    return GroupedMatmuls(lambda rows, sizes: matmul(rows, w13, sizes), lambda rows, sizes: matmul(rows, w2, sizes))


def fp8_matmuls(w13: jax.Array, w13_scale: jax.Array, w2: jax.Array, w2_scale: jax.Array,
                kernel: str = "mosaic-fp8", block_m: int | None = None, layer: jax.Array | int | None = None,
                fuse_swiglu: bool = False, out_dtype=jnp.bfloat16, **kernel_options) -> GroupedMatmuls:
    """gate_up and down reading FP8 blocks directly, on group-aligned rows of block_m: w13
    [E, 2, I, H] with scale [E, 2, I/128, H/128]; w2 [E, H, I] with scale [E, H/128, I/128] (the
    checkpoint's orientation). kernel: one of FP8_KERNELS ("xla-w8a8" is the XLA reference of
    "mosaic-ws-w8a8": the same rounding of the rows, fp32 products, rows contiguous by expert);
    block_m defaults to 64 rows, 128 (WS_BLOCK_ROWS) for the warp-specialised kernel (64 or 128
    there, see `ws_w8a8_block_rows`). The W8A8
    forms round the tokens in `prepare` (`token_rounding`); out_dtype: the reference's products
    (the Mosaic kernels return bf16).

    layer (STACKED_KERNELS only): the four arrays hold every layer ([L, ...] each) and the
    kernels read this layer's from the stacked arrays: XLA copied a layer's slice whole before a
    kernel read it (1.2 GB of gate/up weights a layer at a DEP2 prefill step, docs/benchmarks.md
    run BE; 0.86 ms a layer at W1's DEP4 decode step, run BH). Other paths are given the slice
    (`Experts.__call__` takes it).

    fuse_swiglu ("mosaic-ws-w8a8" only): the gate/up kernel applies SwiGLU and rounds its output
    for the down GEMM in its epilogue (`grouped_gemm_ws.aligned_gate_up_swiglu_w8a8`, its gate
    and up halves on different warpgroups where tiles hold 64 rows), so the
    gate/up product is neither written nor read back: the MoE block of 64 local experts took
    2.84 against 3.26 ms at 32768 tokens and 428 against 523 us at 1212 on an H200 (run BH);
    `Experts` asks for it by default."""
    if fuse_swiglu and kernel != "mosaic-ws-w8a8":
        raise ValueError(f"fuse_swiglu needs the mosaic-ws-w8a8 kernel, not {kernel}")
    if layer is not None and kernel not in STACKED_KERNELS:
        raise ValueError(f"{kernel} takes one layer's experts; a layer index is for {', '.join(STACKED_KERNELS)}")
    *lead, e, _, inter, hidden = w13.shape
    w13 = w13.reshape(*lead, e, 2 * inter, hidden)
    w13_scale = w13_scale.reshape(*lead, e, -1, w13_scale.shape[-1])
    if kernel == "xla-w8a8":
        return _w8a8_reference_matmuls(w13, w13_scale, w2, w2_scale, out_dtype)
    if kernel == "mosaic-ws-w8a8":     # the tokens are rounded to FP8 once, before the gather
        options = dict(block_m=block_m or WS_BLOCK_ROWS, layer=layer, **kernel_options)
        prepare = token_rounding(kernel)
        if fuse_swiglu:
            gate_up = functools.partial(grouped_gemm_ws.aligned_gate_up_swiglu_w8a8, w13=w13, w13_scale=w13_scale,
                                        halves_by_warpgroup=options["block_m"] == grouped_gemm_ws.WG_ROWS, **options)
            down = functools.partial(grouped_gemm_ws.aligned_gemm_w8a8_quantized, w=w2, w_scale=w2_scale, **options)
            return GroupedMatmuls(lambda rows, groups: gate_up(*rows, groups), lambda act, groups: down(*act, groups),
                                  block_rows=options["block_m"], prepare=prepare, activates=True)
        gate_up = functools.partial(grouped_gemm_ws.aligned_gemm_w8a8_quantized, w=w13, w_scale=w13_scale, **options)
        down = functools.partial(grouped_gemm_ws.aligned_gemm_w8a8, w=w2, w_scale=w2_scale, **options)
        return GroupedMatmuls(lambda rows, groups: gate_up(*rows, groups), lambda rows, groups: down(rows, groups),
                              block_rows=options["block_m"], prepare=prepare)
    aligned_gemm = {"mosaic-fp8": grouped_gemm_fp8.aligned_gemm_fp8, "mosaic-w8a8": grouped_gemm_fp8.aligned_gemm_w8a8}[kernel]
    block_m = block_m or 64
    gemm = functools.partial(aligned_gemm, block_m=block_m, layer=layer, **kernel_options)
    return GroupedMatmuls(lambda rows, groups: gemm(rows, groups, w13, w13_scale),
                          lambda rows, groups: gemm(rows, groups, w2, w2_scale), block_rows=block_m)


def nvfp4_block_rows(pairs: int, num_experts: int) -> int:
    """Rows per tile of the NVFP4 kernel for `pairs` token-expert pairs over num_experts experts:
    128 where an expert averages 128 rows or more, 16 where it averages at most 16 (a decode step
    of up to 512 tokens on 256 experts: 64 requests give 2 rows an expert, which tiles of 64 rows
    padded with 62), else 64 (at 64 rows a tile of 128 would be half padding)."""
    if pairs >= 128 * num_experts:
        return 128
    return 16 if pairs <= 16 * num_experts else 64


def nvfp4_tile(block_m: int, columns: int, depth: int) -> dict:
    """`grouped_gemm_nvfp4.aligned_gemm_nvfp4`'s options for tiles of block_m rows against
    `columns` output channels of one global scale (down's N, or half of gate/up's) and K = depth.
    On an H200 at 256 experts (benchmarks/nvfp4_probe.py, docs/benchmarks.md runs EL, EM, EP, EQ):
    256 rows each (a prefill step's share): gate/up 3.72 ms in tiles of 128 rows x 128 columns ->
    3.38 ms in 128 x 256 with the scales applied in the widening ("scaled"), down 2.74 -> 2.33 ms;
    64 rows each: 64 x 128 with fp32 widening ("ptx"), gate/up 1.21 ms against 1.26 for "scaled"; a decode
    step's 1-16 rows an expert: tiles of 16 rows, "scaled" and 256 deep, gate/up 0.54 ms where 64
    rows of fp32 widening took 1.21."""
    if block_m == 128:
        wide = columns % 256 == 0                    # (TP4's 384 intermediate columns are not)
        return dict(block_n=256 if wide else 128, num_warps=8, widen="scaled" if wide else "ptx")
    if block_m == 16:
        return dict(block_n=128, block_k=256 if depth % 256 == 0 else 128, num_warps=4, widen="scaled")
    return dict(block_n=128, num_warps=4, widen="ptx")


def nvfp4_matmuls(w13: jax.Array, w13_scale: jax.Array, w13_scale_2: jax.Array, w2: jax.Array,
                  w2_scale: jax.Array, w2_scale_2: jax.Array, layer: jax.Array | int | None = None,
                  out_dtype=jnp.bfloat16, block_m: int = 64) -> GroupedMatmuls:
    """gate_up and down of NVFP4 experts as `model.Experts` holds them (w13 uint8 [L, E, 2, I,
    H/2] with scales [L, E, 2, I, H/16] and [L, E, 2]; w2 [L, E, H, I/2], [L, E, H, I/16], [L, E];
    layer None: one layer's, unstacked) on group-aligned rows of block_m (`nvfp4_block_rows`), read
    in place by `grouped_gemm_nvfp4.aligned_gemm_nvfp4` (under its interpreter off GPUs)."""
    gate_up, down, layer = _nvfp4_products(w13, w13_scale, w13_scale_2, w2, w2_scale, w2_scale_2, layer)
    gemm = functools.partial(grouped_gemm_nvfp4.aligned_gemm_nvfp4, layer=layer, block_m=block_m,
                             out_dtype=out_dtype, interpret=jax.default_backend() != "gpu")
    gate_up_tile = nvfp4_tile(block_m, w13.shape[-2], 2 * w13.shape[-1])
    down_tile = nvfp4_tile(block_m, w2.shape[-2], 2 * w2.shape[-1])
    return GroupedMatmuls(lambda rows, groups: gemm(rows, groups, *gate_up, **gate_up_tile),
                          lambda rows, groups: gemm(rows, groups, *down, **down_tile), block_rows=block_m)


def _nvfp4_products(w13: jax.Array, w13_scale: jax.Array, w13_scale_2: jax.Array, w2: jax.Array,
                    w2_scale: jax.Array, w2_scale_2: jax.Array, layer: jax.Array | int | None
                    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], jax.Array | int]:
    """(codes, scales, global scales) of the gate/up product ([L, E, 2I, ...], G = 2) and of the
    down product ([L, E, H, ...], G = 1) as the NVFP4 kernels take them, and the layer; unstacked
    experts (layer None) become one layer."""
    if layer is None:
        w13, w13_scale, w13_scale_2, w2, w2_scale, w2_scale_2 = (
            a[None] for a in (w13, w13_scale, w13_scale_2, w2, w2_scale, w2_scale_2))
        layer = 0
    layers, e, _, inter, half_hidden = w13.shape
    gate_up = (w13.reshape(layers, e, 2 * inter, half_hidden), w13_scale.reshape(layers, e, 2 * inter, -1), w13_scale_2)
    return gate_up, (w2, w2_scale, w2_scale_2[..., None]), layer


def _w8a8_reference_matmuls(w13: jax.Array, w13_scale: jax.Array, w2: jax.Array, w2_scale: jax.Array,
                            out_dtype) -> GroupedMatmuls:
    """lax.ragged_dot in fp32 on FP8 experts dequantised to fp32 ([E, N, K], output-major) and
    rows rounded to FP8 per row and 128 columns, as the W8A8 warp-specialised kernel rounds them
    (the tokens in `prepare`, SwiGLU's output before the down GEMM); products in out_dtype, as
    the kernel returns bf16: the rounding of SwiGLU's output then starts from the same numbers."""
    rounding = token_rounding("xla-w8a8")

    def matmul(w: jax.Array, scale: jax.Array) -> RowsMatmul:
        w32 = fp8.dequantize_blockwise(w, scale).transpose(0, 2, 1)       # [E, K, N]
        return lambda rows, sizes: jax.lax.ragged_dot(rows, w32, sizes, precision=jax.lax.Precision.HIGHEST,
                                                      preferred_element_type=jnp.float32).astype(out_dtype)

    gate_up, down = matmul(w13, w13_scale), matmul(w2, w2_scale)
    return GroupedMatmuls(lambda rounded, sizes: gate_up(fp8.dequantize_groups(*rounded), sizes),
                          lambda rows, sizes: down(fp8.dequantize_groups(*rounding(rows)), sizes),
                          prepare=rounding)


def per_pair_experts_fp8(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, local: jax.Array,
                         mine: jax.Array, w13: jax.Array, w13_scale: jax.Array, w2: jax.Array, w2_scale: jax.Array,
                         layer: jax.Array | int | None, interpret: bool = False) -> jax.Array:
    """`per_pair_experts` on FP8 experts as `model.Experts` holds them, stacked over layers
    (w13 [L, E, 2, I, H], w2 [L, E, H, I] and their block scales; layer None: unstacked), each
    pair's expert read in place by `pair_experts.pair_products`. local: [N, k] local expert ids.
    Returns fp32 [N, H]."""
    w13, w13_scale, index = stacked_layers(w13, w13_scale, layer)
    w2, w2_scale, _ = stacked_layers(w2, w2_scale, layer)
    layers, e, _, inter, hidden = w13.shape
    w13, w13_scale = w13.reshape(layers, e, 2 * inter, hidden), w13_scale.reshape(layers, e, -1, w13_scale.shape[-1])
    experts = local.reshape(-1)
    gate_up = lambda rows: pair_experts.pair_products(  # noqa: E731
        rows, w13, w13_scale, index, experts, pairs_per_row=expert_ids.shape[1], interpret=interpret)
    down = lambda rows: pair_experts.pair_products(  # noqa: E731
        rows, w2, w2_scale, index, experts, interpret=interpret)
    return _weighted_pair_sum(x, weights, mine, inter, gate_up, down)


def per_pair_experts_nvfp4(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, local: jax.Array,
                           mine: jax.Array, w13: jax.Array, w13_scale: jax.Array, w13_scale_2: jax.Array,
                           w2: jax.Array, w2_scale: jax.Array, w2_scale_2: jax.Array, layer: jax.Array | int | None,
                           interpret: bool = False) -> jax.Array:
    """`per_pair_experts_fp8` on NVFP4 experts as `model.Experts` holds them (w13 uint8 [L, E, 2,
    I, H/2], w13_scale [L, E, 2, I, H/16], w13_scale_2 [L, E, 2], w2 [L, E, H, I/2], w2_scale
    [L, E, H, I/16], w2_scale_2 [L, E]; layer None: unstacked), each pair's expert read in place
    by `pair_experts.pair_products_nvfp4`. Returns fp32 [N, H]."""
    gate_up_weights, down_weights, layer = _nvfp4_products(w13, w13_scale, w13_scale_2, w2, w2_scale, w2_scale_2,
                                                           layer)
    experts = local.reshape(-1)
    gate_up = lambda rows: pair_experts.pair_products_nvfp4(  # noqa: E731
        rows, *gate_up_weights, layer, experts, pairs_per_row=expert_ids.shape[1], interpret=interpret)
    down = lambda rows: pair_experts.pair_products_nvfp4(rows, *down_weights, layer, experts,  # noqa: E731
                                                         interpret=interpret)
    return _weighted_pair_sum(x, weights, mine, w13.shape[-2], gate_up, down)


def _weighted_pair_sum(x: jax.Array, weights: jax.Array, mine: jax.Array, inter: int,
                    gate_up: Callable[[jax.Array], jax.Array], down: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The per-pair experts' weighted sum [N, H] in fp32, given the pairs' products: gate_up(x)
    [N * k, 2I] in fp32 (pair r reads token r // k) and down(act) [N * k, H]. Pairs not `mine`
    (the in-place kernels read expert 0 for them) are dropped here."""
    n, k = weights.shape
    g = gate_up(x)
    act = (jax.nn.silu(g[:, :inter]) * g[:, inter:]).astype(x.dtype)
    y = jnp.where(mine.reshape(-1, 1), down(act) * weights.reshape(-1, 1), 0.0)
    return y.reshape(n, k, -1).sum(axis=1)


def per_pair_experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w13: jax.Array,
                     w2: jax.Array, mine: jax.Array) -> jax.Array:
    """The same sum for few tokens: pair r = (token, choice) multiplies by its own expert's
    weights, gathered beforehand (w13: [N*k, H, 2, I], w2: [N*k, I, H]); pairs not `mine`
    contribute zero. Reads N*k experts instead of every local one. Returns fp32 [N, H]."""
    k = expert_ids.shape[1]
    gate_up = lambda rows: jnp.einsum(  # noqa: E731    [N*k, 2, I] -> [N*k, 2I]: gate, then up
        "rh,rhji->rji", jnp.repeat(rows, k, axis=0), w13, preferred_element_type=jnp.float32).reshape(w13.shape[0], -1)
    down = lambda act: jnp.einsum("ri,rih->rh", act, w2, preferred_element_type=jnp.float32)  # noqa: E731
    return _weighted_pair_sum(x, weights, mine, w13.shape[-1], gate_up, down)
