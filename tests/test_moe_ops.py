"""The expert computations agree with each other on random data. The Mosaic kernels run under
Pallas' GPU interpreter here (the same kernel body; only the transposed wgmma operand is stored
untransposed, which the interpreter lacks) and are lowered for the CUDA platform. On a Hopper GPU
the same tests compile them for it: `JAX_PLATFORMS=cuda MINIMAX_JAX_KERNEL_TESTS=gpu pytest
tests/test_moe_ops.py` (register layouts, asynchronous copies and the FP8 tensor cores are what
the interpreter cannot check)."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from minimax_jax.ops import aligned_rows, grouped_gemm_fp8, grouped_gemm_ws, moe, pair_experts
from quant import fp8

ON_GPU = os.environ.get("MINIMAX_JAX_KERNEL_TESTS") == "gpu"
INTERPRET = {} if ON_GPU else dict(num_blocks=2, interpret=InterpretGPUParams())
# On a GPU the gate/up products differ from XLA's fp32 ones in their last bf16 bit (another
# summation order), which moves some of SwiGLU's FP8 roundings by a whole FP8 step: the MoE
# block of the W8A8 kernel sits about 1e-2 of its largest output from "xla-w8a8" there (run BJ
# at full size; 5e-6 under the interpreter, where the products are XLA's own).
W8A8_BLOCK_TOLERANCE = 2e-2 if ON_GPU else 1e-3


def tile_rows(block_m: int) -> int:
    """Rows per kernel tile: wgmma's 64 on GPUs; the interpreter also takes the smaller tiles
    that keep these tests fast."""
    return max(block_m, 64) if ON_GPU else block_m


def test_per_pair_experts_equal_the_grouped_gemm_including_foreign_and_padding_pairs():
    rng = np.random.RandomState(0)
    n, k, local, h, i, first = 5, 3, 6, 16, 8, 6          # this device owns experts 6..11
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    ids = jnp.asarray(rng.randint(0, 18, (n, k)), jnp.int32).at[4].set(24)   # token 4: padding
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13 = jnp.asarray(rng.standard_normal((local, h, 2, i)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((local, i, h)), jnp.float32)
    grouped = moe.routed_experts(x, ids, weights, local, first,
                                 moe.weight_matmuls(w13.reshape(local, h, 2 * i), w2, "xla"))
    rel = ids - first
    mine = (rel >= 0) & (rel < local)
    sel = jnp.where(mine, rel, 0).reshape(-1)
    pairs = moe.per_pair_experts(x, ids, weights, w13[sel], w2[sel], mine)
    np.testing.assert_allclose(np.asarray(pairs), np.asarray(grouped), rtol=1e-5, atol=1e-5)
    assert not np.asarray(pairs[4]).any() and np.asarray(mine).any() and not np.asarray(mine).all()
    # the combine's dtype: the same fp32 sum, converted before it leaves (inside the row buckets)
    in_bf16 = moe.routed_experts(x, ids, weights, local, first,
                                 moe.weight_matmuls(w13.reshape(local, h, 2 * i), w2, "xla"), out_dtype=jnp.bfloat16)
    assert in_bf16.dtype == jnp.bfloat16 and grouped.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(in_bf16), np.asarray(grouped.astype(jnp.bfloat16)))


def test_counting_sort_puts_each_pair_where_a_stable_argsort_does():
    keys = np.random.RandomState(4).randint(0, 9, 3000)
    keys[:40] = 8                                           # the past-the-groups key, first
    positions, counts = moe._stable_sort_positions(jnp.asarray(keys, jnp.int32), 9)
    order = np.argsort(keys, kind="stable")
    assert (np.asarray(positions)[order] == np.arange(len(keys))).all()
    assert np.asarray(counts).tolist() == np.bincount(keys, minlength=9).tolist()


def test_row_capacities_shrink_the_gemm_to_the_local_share_only_for_large_batches():
    assert moe.row_capacities(131072, 0.25) == (40960, 65536, 131072)
    assert moe.row_capacities(8192, 0.25) == (8192,)           # decode: no branch
    assert moe.row_capacities(131072, 1.0) == (131072,)        # every expert local


@pytest.mark.parametrize("owner_of_all", [False, True])
def test_routed_experts_are_exact_in_every_row_bucket(owner_of_all):
    """Balanced routing takes the smallest bucket; routing every pair to this device overflows
    it and must take the full one. Both equal the computation over every pair."""
    rng = np.random.RandomState(5)
    n, k, local, experts, h, i = 2048, 8, 4, 16, 16, 8
    first = 0 if owner_of_all else 8
    ids = rng.randint(0, local if owner_of_all else experts, (n, k))
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13 = jnp.asarray(rng.standard_normal((local, h, 2 * i)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((local, i, h)), jnp.float32)
    seen = []

    def gate_up(rows, sizes):
        seen.append(rows.shape[0])
        return moe.ragged_dot_reference(rows, w13, sizes)

    down = lambda rows, sizes: moe.ragged_dot_reference(rows, w2, sizes)  # noqa: E731
    ids = jnp.asarray(ids, jnp.int32)
    matmuls = moe.GroupedMatmuls(gate_up, down)
    bucketed = moe.routed_experts(x, ids, weights, local, first, matmuls, local_share=local / experts)
    everything = moe.routed_experts(x, ids, weights, local, first, matmuls)
    assert seen[:-1] == list(moe.row_capacities(n * k, local / experts)) and seen[-1] == n * k
    np.testing.assert_allclose(np.asarray(bucketed), np.asarray(everything), rtol=1e-5, atol=1e-4)
    assert np.abs(np.asarray(everything)).max() > 0


def test_tokens_rounded_before_the_gather_and_still_packed_give_the_rows_rounded_after_it():
    """What an FP8 dispatch hands the experts (codes and scales rounded where the tokens live,
    packed as the all-gather delivered them) through the row buckets' branch: the same result as
    the tokens rounded inside routed_experts."""
    from sharding.collectives import pack_rows, packed_columns
    rng = np.random.RandomState(8)
    n, k, local, experts, h, i = 2048, 8, 4, 16, 128, 128
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    ids = jnp.asarray(rng.randint(0, experts, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13, s13 = fp8.quantize_blockwise(rng.standard_normal((local, 2, i, h)))
    w2, s2 = fp8.quantize_blockwise(rng.standard_normal((local, h, i)))
    matmuls = moe.fp8_matmuls(w13, s13, w2, s2, kernel="xla-w8a8", out_dtype=jnp.float32)
    share = local / experts
    assert len(moe.row_capacities(n * k, share)) > 1
    rounded = moe.token_rounding("xla-w8a8")(x)
    like = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rounded]
    words = pack_rows(list(rounded))
    packed = moe.PackedTokens(words, *packed_columns(like, words.dtype, jax.tree.structure(rounded)))
    run = lambda tokens, prepared: moe.routed_experts(  # noqa: E731
        tokens, ids, weights, local, 4, matmuls, local_share=share, prepared=prepared)
    inside = np.asarray(run(x, False))
    np.testing.assert_array_equal(np.asarray(run(packed, True)), inside)
    np.testing.assert_array_equal(np.asarray(run(rounded, True)), inside)
    assert np.abs(inside).max() > 0


def test_aligned_layout_starts_each_group_on_its_own_block():
    dest, block_group, m_padded = aligned_rows.layout(jnp.array([5, 0, 30, 16]), 54, 16)
    assert m_padded == (4 + 4) * 16
    dest = np.asarray(dest).tolist()
    assert dest[:5] == [0, 1, 2, 3, 4]                     # group 0 from row 0
    assert dest[5:35] == list(range(16, 46))               # group 2 from block 1 (group 1 is empty)
    assert dest[35:51] == list(range(48, 64))              # group 3 from block 3
    assert dest[51:] == [m_padded] * 3                     # rows past the groups go nowhere
    assert np.asarray(block_group).tolist() == [0, 2, 2, 3, 4, 4, 4, 4]     # 4: no group
    # the rows' groups given (as the MoE block knows them, any value past the groups) skip the search
    row_group = jnp.asarray([0] * 5 + [2] * 30 + [3] * 16 + [4, 9, -1])
    given = aligned_rows.layout(jnp.array([5, 0, 30, 16]), 54, 16, row_group=row_group)
    assert np.asarray(given[0]).tolist() == dest and np.asarray(given[1]).tolist() == np.asarray(block_group).tolist()


def test_the_layout_of_a_smaller_row_bucket_is_a_prefix_of_the_layout_of_every_row():
    """What lets the MoE block build the layout once, before its row buckets' branch."""
    sizes = jnp.array([5, 0, 30, 16])
    small_dest, small_groups, small_m = aligned_rows.layout(sizes, 54, 16)
    dest, groups, m_all = aligned_rows.layout(sizes, 200, 16)
    assert small_m == aligned_rows.padded_rows(54, 4, 16) < m_all
    assert np.asarray(groups)[:small_m // 16].tolist() == np.asarray(small_groups).tolist()
    assert np.asarray(dest)[:51].tolist() == np.asarray(small_dest)[:51].tolist()   # the rows in groups
    assert (np.asarray(dest)[51:] == m_all).all()            # past the groups: beyond any bucket


@pytest.mark.parametrize("sizes, block_m", [([5, 0, 30], 16), ([0, 64, 1, 17], 32), ([0, 0, 0], 16), ([40, 3], 16)])
def test_fp8_kernel_equals_dequantised_ragged_dot(sizes, block_m):
    rng = np.random.RandomState(len(sizes) + block_m)
    block_m = tile_rows(block_m)
    g, n, k, m = len(sizes), 256, 256, sum(sizes) + 9                # 9 rows past the groups
    w, scale = fp8.quantize_blockwise(rng.standard_normal((g, n, k)) * rng.uniform(0.1, 10, (g, n, 1)))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_gemm_fp8.grouped_gemm_fp8(x, w, scale, group_sizes, block_m=block_m,
                                            max_concurrent_steps=2, **INTERPRET)
    ref = grouped_gemm_fp8.reference(x, w, scale, group_sizes)
    valid = sum(sizes)
    assert not np.asarray(out[valid:], np.float32).any()        # rows past the groups are 0
    out, ref = np.asarray(out[:valid], np.float32), np.asarray(ref[:valid], np.float32)
    # bf16 operands either way; only the f32 summation order and the final bf16 rounding differ
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=1e-2 * max(np.abs(ref).max(initial=0), 1))


@pytest.mark.parametrize("sizes, block_m", [([5, 0, 30], 16), ([0, 64, 1, 17], 32)])
def test_w8a8_kernel_equals_the_reference_on_rows_rounded_to_fp8(sizes, block_m):
    rng = np.random.RandomState(7 + block_m)
    block_m = tile_rows(block_m)
    g, n, k, m = len(sizes), 256, 256, sum(sizes) + 9
    w, scale = fp8.quantize_blockwise(rng.standard_normal((g, n, k)) * rng.uniform(0.1, 10, (g, n, 1)))
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1)), jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_gemm_fp8.grouped_gemm_w8a8(x, w, scale, group_sizes, block_m=block_m,
                                             max_concurrent_steps=2, **INTERPRET)
    valid = sum(sizes)
    assert not np.asarray(out[valid:], np.float32).any()
    ref = np.asarray(grouped_gemm_fp8.reference_w8a8(x, w, scale, group_sizes)[:valid], np.float32)
    weight_only = np.asarray(grouped_gemm_fp8.reference(x, w, scale, group_sizes)[:valid], np.float32)
    out = np.asarray(out[:valid], np.float32)
    # rows span four decades: each row against its own largest value
    row_scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1e-30)
    np.testing.assert_array_less(np.abs(out - ref) / row_scale, 2e-2)
    # the rows' FP8 rounding: a few percent from the weight-only product, no more
    rel = np.linalg.norm(out - weight_only) / np.linalg.norm(weight_only)
    assert 1e-3 < rel < 5e-2


@pytest.mark.parametrize("w8a8", [False, True])
def test_fp8_kernels_apply_each_k_block_its_own_scale(w8a8):
    """Scales that differ along K by four decades catch a step using another step's scale."""
    rng = np.random.RandomState(11)
    sizes, n, k = [7, 20], 128, 512
    w_f32 = rng.standard_normal((2, n, k)) * np.repeat(10.0 ** rng.uniform(-2, 2, (2, 1, k // 128)), 128, axis=-1)
    w, scale = fp8.quantize_blockwise(w_f32)
    x = jnp.asarray(rng.standard_normal((sum(sizes) + 3, k)), jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    gemm = grouped_gemm_fp8.grouped_gemm_w8a8 if w8a8 else grouped_gemm_fp8.grouped_gemm_fp8
    ref = grouped_gemm_fp8.reference_w8a8 if w8a8 else grouped_gemm_fp8.reference
    out = np.asarray(gemm(x, w, scale, group_sizes, block_m=tile_rows(16), max_concurrent_steps=2,
                          **INTERPRET)[:sum(sizes)], np.float32)
    want = np.asarray(ref(x, w, scale, group_sizes)[:sum(sizes)], np.float32)
    np.testing.assert_allclose(out, want, rtol=2e-2, atol=1e-2 * np.abs(want).max())


def _aligned_reference_matmuls(w13: jax.Array, w2: jax.Array, block_rows: int) -> moe.GroupedMatmuls:
    """GEMMs on group-aligned rows in XLA: each block of rows times its group's weights
    ([G, N, K]); blocks of no group come back NaN (the kernels leave them unset)."""
    def matmul(w):
        def on_blocks(rows, block_group):
            blocks = rows.reshape(-1, block_rows, rows.shape[-1])
            out = jnp.einsum("bmk,bnk->bmn", blocks, w[jnp.minimum(block_group, len(w) - 1)])
            return jnp.where((block_group < len(w))[:, None, None], out, jnp.nan).reshape(rows.shape[0], -1)
        return on_blocks
    return moe.GroupedMatmuls(matmul(w13), matmul(w2), block_rows=block_rows)


@dataclasses.dataclass
class RowBucketCase:
    """2048 tokens routed to 8 of 16 experts, 4 of them local (the first at `first`): with
    owner_of_all every pair is local and the largest row bucket runs, else about a quarter and
    the smallest."""
    x: jax.Array
    ids: jax.Array
    weights: jax.Array
    w13: jax.Array
    w2: jax.Array
    first: int
    local: int = 4
    experts: int = 16
    block_rows: int = 16

    @classmethod
    def make(cls, owner_of_all: bool) -> "RowBucketCase":
        rng = np.random.RandomState(9)
        n, k, local, experts, h, i = 2048, 8, 4, 16, 16, 8
        ids = jnp.asarray(rng.randint(0, local if owner_of_all else experts, (n, k)), jnp.int32)
        x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
        weights = jnp.asarray(rng.random((n, k)), jnp.float32)
        w13 = jnp.asarray(rng.standard_normal((local, 2 * i, h)), jnp.float32)
        w2 = jnp.asarray(rng.standard_normal((local, h, i)), jnp.float32)
        return cls(x, ids, weights, w13, w2, 0 if owner_of_all else 8)

    def aligned(self) -> jax.Array:
        """routed_experts on group-aligned rows in XLA (`_aligned_reference_matmuls`)."""
        return moe.routed_experts(self.x, self.ids, self.weights, self.local, self.first,
                                  _aligned_reference_matmuls(self.w13, self.w2, self.block_rows),
                                  local_share=self.local / self.experts)


@pytest.mark.parametrize("owner_of_all", [False, True])
def test_routed_experts_on_group_aligned_rows_equal_contiguous_rows(owner_of_all):
    """The layout built once for both GEMMs, gathered from the tokens, in every row bucket;
    blocks of no group come back NaN from the GEMMs and must never reach the result."""
    case = RowBucketCase.make(owner_of_all)
    contiguous = moe.routed_experts(case.x, case.ids, case.weights, case.local, case.first,
                                    moe.weight_matmuls(case.w13, case.w2, "xla", output_major=True))
    aligned = case.aligned()
    assert np.isfinite(np.asarray(aligned)).all() and np.abs(np.asarray(contiguous)).max() > 0
    np.testing.assert_allclose(np.asarray(aligned), np.asarray(contiguous), rtol=1e-5, atol=1e-4)


def test_aligned_layout_has_no_loop():
    """A binary search is a loop, which XLA runs as kernel launches per halving on GPUs."""
    jaxpr = jax.make_jaxpr(lambda sizes: aligned_rows.layout(sizes, 4096, 64)[:2])(
        jnp.ones((256,), jnp.int32))
    assert "while" not in str(jaxpr) and "scan" not in str(jaxpr)


@pytest.mark.parametrize("kernel, tolerance", [("mosaic-fp8", 2e-2), ("mosaic-w8a8", 5e-2), ("mosaic-ws-w8a8", 5e-2)])
def test_routed_experts_through_the_fp8_kernels_equal_the_dequantised_reference(kernel, tolerance):
    rng = np.random.RandomState(1)
    n, k, local, h, i, first = 12, 2, 4, 128, 128, 4      # experts 4..7 here, ids up to 11
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    ids = jnp.asarray(rng.randint(0, 12, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13, s13 = fp8.quantize_blockwise(rng.standard_normal((local, 2, i, h)) * 0.05)
    w2, s2 = fp8.quantize_blockwise(rng.standard_normal((local, h, i)) * 0.05)
    fused = moe.routed_experts(x, ids, weights, local, first,
                               moe.fp8_matmuls(w13, s13, w2, s2, kernel=kernel, **INTERPRET,
                                               block_m=128 if kernel == "mosaic-ws-w8a8" else tile_rows(16)))
    w13_bf16 = fp8.dequantize_blockwise(w13, s13, jnp.bfloat16).reshape(local, 2 * i, h)
    w2_bf16 = fp8.dequantize_blockwise(w2, s2, jnp.bfloat16)
    ref = moe.routed_experts(x, ids, weights, local, first,
                             moe.weight_matmuls(w13_bf16, w2_bf16, "xla", output_major=True))
    scale = np.abs(np.asarray(ref)).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=tolerance * scale)


@pytest.mark.parametrize("kernel, block_rows", [("mosaic-fp8", 64), ("mosaic-w8a8", 64), ("mosaic-ws-w8a8", 128)])
def test_fp8_matmuls_lay_rows_out_in_their_kernels_default_blocks(kernel, block_rows):
    w13, s13 = fp8.quantize_blockwise(np.ones((2, 2, 128, 256), np.float32))
    w2, s2 = fp8.quantize_blockwise(np.ones((2, 256, 128), np.float32))
    matmuls = moe.fp8_matmuls(w13, s13, w2, s2, kernel=kernel)
    assert matmuls.block_rows == block_rows
    assert (matmuls.prepare is not None) == (kernel == "mosaic-ws-w8a8")


def test_routed_experts_through_the_w8a8_kernel_equal_its_xla_reference():
    """The W8A8 kernel against "xla-w8a8" (the same rounding, fp32 products, bf16 results): the
    rows' rounding, which moves the result from the weight-only one by a few percent, is out of
    the comparison."""
    rng = np.random.RandomState(15)
    n, k, local, h, i, first = 40, 2, 4, 256, 128, 4       # experts 4..7 here, ids up to 11
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    ids = jnp.asarray(rng.randint(0, 12, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13, s13 = fp8.quantize_blockwise(rng.standard_normal((local, 2, i, h)) * rng.uniform(0.01, 1, (local, 1, 1, 1)))
    w2, s2 = fp8.quantize_blockwise(rng.standard_normal((local, h, i)) * rng.uniform(0.01, 1, (local, 1, 1)))
    kernel = moe.routed_experts(x, ids, weights, local, first,
                                moe.fp8_matmuls(w13, s13, w2, s2, kernel="mosaic-ws-w8a8", **INTERPRET))
    reference = moe.routed_experts(x, ids, weights, local, first, moe.fp8_matmuls(w13, s13, w2, s2, kernel="xla-w8a8"))
    weight_only = moe.routed_experts(x, ids, weights, local, first, moe.weight_matmuls(
        fp8.dequantize_blockwise(w13, s13).reshape(local, 2 * i, h), fp8.dequantize_blockwise(w2, s2), "xla",
        output_major=True))
    scale = np.abs(np.asarray(reference)).max()
    err = np.abs(np.asarray(kernel) - np.asarray(reference)).max() / scale
    rounding = np.abs(np.asarray(weight_only) - np.asarray(reference)).max() / scale
    assert err < W8A8_BLOCK_TOLERANCE and rounding > 1e-2, (err, rounding)     # 5e-6 and 4e-2 when written


@pytest.mark.parametrize("block_m,by_warpgroup", [(128, False), (64, False), (64, True)])
def test_swiglu_in_the_gate_up_kernel_rounds_as_the_unfused_path(block_m, by_warpgroup):
    """The epilogue's SwiGLU and FP8 rounding against the gate/up kernel, SwiGLU in XLA and
    quantize_groups: the same scales, the same FP8 codes but for the odd tie that exp's last bit
    moves; also with the gate and up halves on different warpgroups (the up product handed over
    in shared memory)."""
    rng = np.random.RandomState(16)
    sizes, inter, k = [5, 0, 130, 17], 256, 384
    m = sum(sizes) + 9
    w, scale = fp8.quantize_blockwise(rng.standard_normal((len(sizes), 2 * inter, k))
                                      * rng.uniform(0.01, 1, (len(sizes), 2 * inter, 1)))
    xq, xs = fp8.quantize_groups(jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1)), jnp.bfloat16))
    dest, block_group, m_padded = aligned_rows.layout(jnp.asarray(sizes), m, block_m)
    source = aligned_rows.sources(jnp.arange(m), dest, m_padded, fill=m)
    xq, xs = (jnp.take(a, source, axis=0, mode="fill", fill_value=0) for a in (xq, xs))
    opts = dict(max_concurrent_steps=2, block_m=block_m, **INTERPRET)
    act, act_scale = grouped_gemm_ws.aligned_gate_up_swiglu_w8a8(xq, xs, block_group, w, scale,
                                                                 halves_by_warpgroup=by_warpgroup, **opts)
    gate_up = grouped_gemm_ws.aligned_gemm_w8a8_quantized(xq, xs, block_group, w, scale, **opts).astype(jnp.float32)
    want, want_scale = fp8.quantize_groups((jax.nn.silu(gate_up[:, :inter]) * gate_up[:, inter:]).astype(jnp.bfloat16))
    rows = np.asarray(block_group)[np.arange(m_padded) // block_m] < len(sizes)       # blocks that hold rows
    assert act.dtype == jnp.float8_e4m3fn and act_scale.shape == (m_padded, inter // 128)
    np.testing.assert_allclose(np.asarray(act_scale)[rows], np.asarray(want_scale)[rows], rtol=1e-5)
    codes, want_codes = (np.asarray(a, np.float32)[rows] for a in (act, want))
    assert np.mean(codes != want_codes) < 1e-3 and np.abs(want_codes).max() > 100


@pytest.mark.parametrize("block_m", [128, 64])
def test_routed_experts_with_swiglu_in_the_kernel_equal_the_w8a8_reference(block_m):
    """Gate and up weights of different magnitudes per expert: a scale row of the other half
    shows. 2e-5 of the largest output when written."""
    rng = np.random.RandomState(17)
    n, k, local, h, i, first = 40, 2, 4, 256, 256, 4
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    ids = jnp.asarray(rng.randint(0, 12, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13, s13 = fp8.quantize_blockwise(rng.standard_normal((local, 2, i, h)) * 10.0 ** rng.uniform(-2, 1, (local, 2, 1, 1)))
    w2, s2 = fp8.quantize_blockwise(rng.standard_normal((local, h, i)) * rng.uniform(0.01, 1, (local, 1, 1)))
    fused = moe.routed_experts(x, ids, weights, local, first, moe.fp8_matmuls(
        w13, s13, w2, s2, kernel="mosaic-ws-w8a8", fuse_swiglu=True, block_m=block_m, **INTERPRET))
    reference = moe.routed_experts(x, ids, weights, local, first, moe.fp8_matmuls(w13, s13, w2, s2, kernel="xla-w8a8"))
    scale = np.abs(np.asarray(reference)).max()
    assert scale > 0 and np.abs(np.asarray(fused) - np.asarray(reference)).max() < W8A8_BLOCK_TOLERANCE * scale
    with pytest.raises(ValueError, match="fuse_swiglu needs the mosaic-ws-w8a8 kernel"):
        moe.fp8_matmuls(w13, s13, w2, s2, kernel="mosaic-fp8", fuse_swiglu=True)


def test_routed_experts_through_the_warp_specialised_kernel_equal_the_reference():
    """Dequantised experts in the checkpoint's orientation on group-aligned rows of 128, under
    the interpreter; the row blocks' last one is partial and some experts get no rows."""
    rng = np.random.RandomState(2)
    n, k, local, h, i, first = 40, 2, 4, 256, 128, 4       # experts 4..7 here, ids up to 11
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    ids = jnp.asarray(rng.choice([4, 6, 9, 11], (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13 = jnp.asarray(rng.standard_normal((local, 2 * i, h)) * 0.05, jnp.bfloat16)
    w2 = jnp.asarray(rng.standard_normal((local, h, i)) * 0.05, jnp.bfloat16)
    matmuls = moe.weight_matmuls(w13, w2, "mosaic-ws", output_major=True, **INTERPRET)
    out = moe.routed_experts(x, ids, weights, local, first, matmuls)
    ref = moe.routed_experts(x, ids, weights, local, first, moe.weight_matmuls(w13, w2, "xla", output_major=True))
    scale = np.abs(np.asarray(ref)).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-2 * scale)


@pytest.mark.parametrize("sizes,block_m", [([5, 0, 130, 17], 128), ([5, 0, 130, 17], 64), ([0, 0, 0], 128)])
def test_w8a8_warp_specialised_kernel_equals_fp32_products_of_the_fp8_operands(sizes, block_m):
    """Rows spanning four decades, weight scales that differ along K by four decades (a step
    using another step's scale shows), rows rounded per 128 columns: against the product of the
    same FP8 operands in fp32, only the fp32 summation order and the bf16 output differ. Tiles
    of 128 rows split between the warpgroups by rows, of 64 by columns."""
    rng = np.random.RandomState(12)
    g, n, k, m = len(sizes), 256, 384, sum(sizes) + 9
    w_f32 = (rng.standard_normal((g, n, k)) * rng.uniform(0.1, 10, (g, n, 1))
             * np.repeat(10.0 ** rng.uniform(-2, 2, (g, 1, k // 128)), 128, axis=-1))
    w, scale = fp8.quantize_blockwise(w_f32)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1)), jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    gemm = functools.partial(grouped_gemm_ws.aligned_gemm_w8a8, w=w, w_scale=scale, max_concurrent_steps=2,
                             block_m=block_m, **INTERPRET)
    out = np.asarray(aligned_rows.on_aligned_rows(gemm, x, group_sizes, block_m), np.float32)
    xq, xs = fp8.quantize_groups(x)
    ref = jax.lax.ragged_dot(fp8.dequantize_groups(xq, xs), fp8.dequantize_blockwise(w, scale).transpose(0, 2, 1),
                             group_sizes, precision="highest")
    valid = sum(sizes)
    assert not out[valid:].any()
    ref = np.asarray(ref[:valid])
    row_scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1e-30)
    np.testing.assert_array_less(np.abs(out[:valid] - ref) / row_scale, 8e-3)


@pytest.mark.parametrize("kernel", ["mosaic-ws-w8a8", "mosaic-fp8", "mosaic-w8a8"])
def test_mosaic_fp8_matmuls_read_a_layer_of_stacked_weights_as_its_slice(kernel):
    """Given every layer's experts and an index, the kernel reads that layer in place; the
    result equals running on the layer's slice, bit for bit."""
    rng = np.random.RandomState(13)
    layers, local, h, i, n, k, first = 3, 4, 256, 128, 40, 2, 0
    w13, s13 = fp8.quantize_blockwise(rng.standard_normal((layers, local, 2, i, h)) * rng.uniform(0.01, 1, (layers, 1, 1, 1, 1)))
    w2, s2 = fp8.quantize_blockwise(rng.standard_normal((layers, local, h, i)) * rng.uniform(0.01, 1, (layers, 1, 1, 1)))
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    ids = jnp.asarray(rng.randint(0, local, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    opts = dict(kernel=kernel, **INTERPRET)
    stacked = moe.routed_experts(x, ids, weights, local, first, moe.fp8_matmuls(w13, s13, w2, s2, layer=jnp.int32(1), **opts))
    sliced = moe.routed_experts(x, ids, weights, local, first, moe.fp8_matmuls(w13[1], s13[1], w2[1], s2[1], **opts))
    other = moe.routed_experts(x, ids, weights, local, first, moe.fp8_matmuls(w13[2], s13[2], w2[2], s2[2], **opts))
    np.testing.assert_array_equal(np.asarray(stacked), np.asarray(sliced))
    assert np.abs(np.asarray(stacked) - np.asarray(other)).max() > 1e-3 * np.abs(np.asarray(sliced)).max()
    with pytest.raises(ValueError, match="takes one layer's experts"):
        moe.fp8_matmuls(w13, s13, w2, s2, layer=jnp.int32(1), kernel="xla-w8a8")


@pytest.mark.parametrize("kernel,tokens,expert_format", [
    ("mosaic-ws-w8a8", 40, "fp8"), ("mosaic-fp8", 40, "fp8"), ("xla", 40, "fp8"), ("xla-w8a8", 40, "fp8"),
    ("auto", 1, "fp8"), ("auto", 1, "nvfp4"), ("triton-nvfp4", 40, "nvfp4")])
def test_stacked_experts_given_a_layer_equal_that_layers_own_module(kernel, tokens, expert_format, monkeypatch):
    """The model's scan hands Experts every layer's weights and the layer's index: through the
    Mosaic FP8 kernels (which read the layer in place), through a per-layer slice (every other
    path), and for few tokens on a Hopper GPU (each pair's expert read in place by the pair
    kernel, not the FP8 kernel that "auto" names) the result is that layer's own module's, bit
    for bit. 40 tokens' 80 pairs over 8 experts are a decode-sized step: the W8A8 kernel's tiles
    take 64 rows; one token's 2 pairs are few enough for the pair kernels (`Experts._path`)."""
    from flax import nnx
    from minimax_jax.config import preset
    from minimax_jax.model import Experts
    cfg = dataclasses.replace(preset("tiny"), hidden_size=256, intermediate_size=256, num_experts=8)
    layers = [Experts(cfg, jnp.bfloat16, nnx.Rngs(i), expert_format=expert_format) for i in range(3)]
    graphdef, _ = nnx.split(layers[0])
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(e)[1] for e in layers]))
    for experts in layers + [stacked]:
        experts.kernel = kernel
    tiles, fp8_matmuls = [], moe.fp8_matmuls

    def fp8_matmuls_interpreted(*args, **kwargs):
        tiles.append(kwargs.get("block_m"))
        return fp8_matmuls(*args, **kwargs, **INTERPRET)
    monkeypatch.setattr(moe, "fp8_matmuls", fp8_matmuls_interpreted)
    pair_kernels = []

    def interpreted(name):
        kernel_fn = getattr(pair_experts, name)

        def run(*args, **kwargs):
            pair_kernels.append(name)
            return kernel_fn(*args, **{**kwargs, "interpret": not ON_GPU})
        return run
    for name in ("pair_products", "pair_products_nvfp4"):
        monkeypatch.setattr(pair_experts, name, interpreted(name))
    monkeypatch.setattr(moe, "on_hopper", lambda: True)
    rng = np.random.RandomState(14)
    x = jnp.asarray(rng.standard_normal((tokens, 256)), jnp.bfloat16)
    ids = jnp.asarray(rng.randint(0, 8, (tokens, 2)), jnp.int32)
    weights = jnp.asarray(rng.random((tokens, 2)), jnp.float32)
    got = np.asarray(stacked(x, ids, weights, first_expert=0, layer=jnp.int32(1)))
    np.testing.assert_array_equal(got, np.asarray(layers[1](x, ids, weights, first_expert=0)))
    if tokens == 1:         # both products of every call through the format's pair kernel
        assert pair_kernels == 4 * [{"fp8": "pair_products", "nvfp4": "pair_products_nvfp4"}[expert_format]]
    if kernel == "mosaic-ws-w8a8":
        assert set(tiles) == {64}
    assert np.abs(got - np.asarray(layers[2](x, ids, weights, first_expert=0))).max() > 0
    with pytest.raises(ValueError, match="stacked over layers"):
        layers[1](x, ids, weights, first_expert=0, layer=jnp.int32(1))


def test_warp_specialised_kernel_lowers_for_gpus_and_takes_checkpoint_layout_experts_only():
    g, n, k, m = 64, 3072, 3072, 81920 + 64 * 128
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m // 128,), jnp.int32),
            jax.ShapeDtypeStruct((g, n, k), jnp.bfloat16))
    f = jax.jit(functools.partial(grouped_gemm_ws.aligned_gemm, num_blocks=132))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert moe.resolve_kernel("mosaic-ws", "fp8", 3072, 1536) == "mosaic-ws"
    # the W8A8 kernel as the engine runs it: every layer's experts, and a traced layer index
    layers = 62
    w8a8_args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m // 128,), jnp.int32),
                 jax.ShapeDtypeStruct((layers, g, n, k), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((layers, g, n // 128, k // 128), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
    f = jax.jit(lambda x, groups, w, s, layer: grouped_gemm_ws.aligned_gemm_w8a8(x, groups, w, s, layer=layer,
                                                                                num_blocks=132))
    assert "mosaic_gpu" in f.trace(*w8a8_args).lower(lowering_platforms=("cuda",)).as_text()
    f = jax.jit(lambda x, groups, w, s, layer: grouped_gemm_fp8.aligned_gemm_fp8(x, groups, w, s, layer=layer,
                                                                                block_m=128, num_blocks=132))
    assert "mosaic_gpu" in f.trace(*w8a8_args).lower(lowering_platforms=("cuda",)).as_text()
    fused_args = (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
                  *w8a8_args[1:])
    f = jax.jit(lambda xq, xs, groups, w, s, layer: grouped_gemm_ws.aligned_gate_up_swiglu_w8a8(
        xq, xs, groups, w, s, layer=layer, num_blocks=132))
    assert "mosaic_gpu" in f.trace(*fused_args).lower(lowering_platforms=("cuda",)).as_text()
    few_rows_args = (*fused_args[:2], jax.ShapeDtypeStruct((m // 64,), jnp.int32), *fused_args[3:])
    for by_warpgroup in (False, True):
        f = jax.jit(lambda xq, xs, groups, w, s, layer: grouped_gemm_ws.aligned_gate_up_swiglu_w8a8(
            xq, xs, groups, w, s, layer=layer, block_m=64, halves_by_warpgroup=by_warpgroup, num_blocks=132))
        assert "mosaic_gpu" in f.trace(*few_rows_args).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(ValueError, match="mosaic-ws needs FP8 or NVFP4"):
        moe.resolve_kernel("mosaic-ws", "bf16", 3072, 1536)


def test_w8a8_tiles_take_64_rows_where_experts_hold_few_and_the_columns_split():
    assert moe.ws_w8a8_block_rows(256 * 8, 256, 1536, 3072) == 64            # one GPU, 256 requests decoding
    assert moe.ws_w8a8_block_rows(1212 * 8, 256, 1536, 3072) == 64           # W1's DEP4 decode step
    assert moe.ws_w8a8_block_rows(4 * 8192 * 8, 256, 1536, 3072) == 128      # a DEP4 prefill step
    assert moe.ws_w8a8_block_rows(256 * 8, 256, 384, 3072) == 64             # TP4 experts: 384 columns
    assert moe.ws_w8a8_block_rows(256 * 8, 256, 192, 3072) == 128            # TP8: 192 do not split in 128
    assert moe.ws_w8a8_block_rows(256 * 8, 256, 1536, 384) == 128            # a down GEMM of 384 columns


def test_auto_kernel_on_hopper_is_mosaic_for_bf16_the_w8a8_ws_kernel_for_fp8_and_triton_for_nvfp4(monkeypatch):
    monkeypatch.setattr(moe, "on_hopper", lambda: True)
    assert moe.resolve_kernel("auto", "bf16", 3072, 1536) == "mosaic"
    assert moe.resolve_kernel("auto", "fp8", 3072, 1536) == "mosaic-ws-w8a8"
    assert moe.resolve_kernel("auto", "fp8", 3072, 384) == "mosaic-ws-w8a8"        # TP4 experts
    assert moe.resolve_kernel("auto", "fp8", 3072, 192) == "mosaic"                 # TP8: not in 128 blocks
    assert moe.resolve_kernel("auto", "nvfp4", 3072, 1536) == "triton-nvfp4"
    assert moe.resolve_kernel("auto", "nvfp4", 3072, 192) == "mosaic"               # TP8: not in 128 columns
    with pytest.raises(ValueError, match="triton-nvfp4 needs NVFP4 experts"):
        moe.resolve_kernel("triton-nvfp4", "fp8", 3072, 1536)
    assert moe.resolve_kernel("auto", "fp8", 3072, 1536, dtype=jnp.float32) == "xla"


def test_auto_kernel_is_the_reference_off_gpu_and_mosaic_fp8_needs_fp8_in_128_blocks(monkeypatch):
    monkeypatch.setattr(moe, "on_hopper", lambda: False)      # as on CPUs (this file also runs on GPUs)
    assert moe.resolve_kernel("auto", "fp8", 3072, 1536) == "xla"
    assert moe.resolve_kernel("mosaic-fp8", "fp8", 3072, 1536) == "mosaic-fp8"
    with pytest.raises(ValueError, match="multiples of 128"):
        moe.resolve_kernel("mosaic-fp8", "fp8", 64, 32)
    with pytest.raises(ValueError, match="needs FP8 experts"):
        moe.resolve_kernel("mosaic-fp8", "bf16", 3072, 1536)
    with pytest.raises(ValueError, match="mosaic-w8a8 needs FP8 experts"):
        moe.resolve_kernel("mosaic-w8a8", "nvfp4", 3072, 1536)
    with pytest.raises(ValueError, match="must be one of"):
        moe.resolve_kernel("triton", "bf16", 64, 32)


@pytest.mark.parametrize("kernel", ["fp8", "fp8 WGMMA", "w8a8"])
def test_fp8_kernels_lower_for_gpus_at_full_size(kernel):
    """Mosaic's Python lowering (layout inference included, where earlier versions of this
    kernel failed or searched without end) runs here for the CUDA platform; the GPU's own
    compile of the lowered module is left to the device benchmarks."""
    g, n, k, m = 64, 3072, 3072, 2048
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, n, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((g, n // 128, k // 128), jnp.float32), jax.ShapeDtypeStruct((g,), jnp.int32))
    gemm = {"fp8": grouped_gemm_fp8.grouped_gemm_fp8,
            "fp8 WGMMA": functools.partial(grouped_gemm_fp8.grouped_gemm_fp8, load_layout="WGMMA"),
            "w8a8": grouped_gemm_fp8.grouped_gemm_w8a8}[kernel]
    f = jax.jit(lambda x, w, s, sizes: gemm(x, w, s, sizes, num_blocks=132))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_fp8_pairs_read_in_place_equal_the_per_pair_path_on_dequantised_experts():
    """Two tokens' pairs against layer 1 of experts stacked over 2 layers, one pair's expert on
    another device (it adds nothing); the Triton kernel under its interpreter here."""
    rng = np.random.RandomState(3)
    layers, experts, hidden, inter = 2, 4, 256, 256
    w13, w13_scale = fp8.quantize_blockwise(rng.standard_normal((layers, experts, 2, inter, hidden)) * 0.05)
    w2, w2_scale = fp8.quantize_blockwise(rng.standard_normal((layers, experts, hidden, inter)) * 0.05)
    x = jnp.asarray(rng.standard_normal((2, hidden)), jnp.float32)
    expert_ids = jnp.asarray([[5, 2], [3, 4]], jnp.int32)            # global ids; this device holds 2..5
    weights = jnp.asarray([[0.7, 0.3], [0.6, 0.4]], jnp.float32)
    local = expert_ids - 2
    mine = (local >= 0) & (local < experts)
    expert_ids, local, mine = expert_ids.at[1, 1].set(9), local.at[1, 1].set(7), mine.at[1, 1].set(False)
    out = moe.per_pair_experts_fp8(x, expert_ids, weights, local, mine, w13, w13_scale, w2, w2_scale, 1,
                                   interpret=not ON_GPU)
    picked = jnp.where(mine, local, 0).reshape(-1)
    dense13 = fp8.dequantize_blockwise(w13[1], w13_scale[1])[picked].transpose(0, 3, 1, 2)     # [R, H, 2, I]
    dense2 = fp8.dequantize_blockwise(w2[1], w2_scale[1])[picked].transpose(0, 2, 1)           # [R, I, H]
    ref = moe.per_pair_experts(x, expert_ids, weights, dense13, dense2, mine)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    # the layer index is read: layer 0's experts give another answer
    other = moe.per_pair_experts_fp8(x, expert_ids, weights, local, mine, w13, w13_scale, w2, w2_scale, 0,
                                     interpret=not ON_GPU)
    assert not np.allclose(np.asarray(other), np.asarray(ref), atol=1e-2 * float(jnp.abs(ref).max()))


def test_fp8_pair_kernel_lowers_for_gpus_at_full_size_and_refuses_weights_it_would_offset_wrongly():
    """W3's gate/up experts on TP2 MoE-TP (62 layers, 256 experts of 2 x 768 rows) lower to
    Triton here; 4 layers' worth on TP4 (2.4e9 FP8 entries, under 4 GiB) would wrap."""
    args = (jax.ShapeDtypeStruct((8, 3072), jnp.bfloat16), jax.ShapeDtypeStruct((62, 256, 1536, 3072), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((62, 256, 12, 24), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((8,), jnp.int32))
    text = jax.jit(pair_experts.pair_products).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    wraps = jax.ShapeDtypeStruct((4, 256, 768, 3072), jnp.float8_e4m3fn)
    assert not pair_experts.supports(wraps) and pair_experts.supports(args[1])


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_pair_products_split_over_k_equal_the_reference(splits):
    rng = np.random.RandomState(4)
    w, scale = fp8.quantize_blockwise(rng.standard_normal((2, 3, 256, 512)) * 0.05)
    rows = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    experts = jnp.asarray([2, 0, 2], jnp.int32)
    out = pair_experts.pair_products(rows, w, scale, 1, experts, splits=splits, interpret=not ON_GPU)
    ref = pair_experts.reference(rows, w, scale, 1, experts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_pair_products_read_each_tokens_row_for_all_its_choices():
    """Two tokens of two choices each: pair r reads row r // 2, as a row repeated per pair would;
    an expert id out of range reads expert 0 (its pair is dropped by the caller)."""
    rng = np.random.RandomState(5)
    w, scale = fp8.quantize_blockwise(rng.standard_normal((2, 3, 256, 512)) * 0.05)
    rows = jnp.asarray(rng.standard_normal((2, 512)), jnp.float32)
    experts = jnp.asarray([2, 0, 1, 7], jnp.int32)
    out = pair_experts.pair_products(rows, w, scale, 1, experts, pairs_per_row=2, interpret=not ON_GPU)
    ref = pair_experts.reference(jnp.repeat(rows, 2, axis=0), w, scale, 1, jnp.asarray([2, 0, 1, 0], jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_e2m1_codes_read_as_e4m3_are_their_values_over_64_for_every_byte():
    import ml_dtypes
    from quant import nvfp4
    codes = np.arange(256, dtype=np.uint8)
    value = lambda nibbles: (nibbles & 0xF).view(ml_dtypes.float4_e2m1fn).astype(np.float32)  # noqa: E731
    low, high = nvfp4.e2m1_as_e4m3(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(low.astype(jnp.float32)) * 64, value(codes))
    np.testing.assert_array_equal(np.asarray(high.astype(jnp.float32)) * 64, value(codes >> 4))
    decoded = np.asarray(nvfp4.decode_e2m1(codes))            # the low nibble, sign of zero included
    np.testing.assert_array_equal(decoded, value(codes))
    assert (np.signbit(decoded) == np.signbit(value(codes))).all()


def test_scaled_e2m1_widening_is_exact_for_every_byte_and_scale_magnitude():
    """`triton_common.widen_scaled_nibbles` (the PTX on a GPU, E4M3 elsewhere): every code byte
    times each of 8 E4M3 scales from the smallest subnormal to 448, over SCALED_NIBBLE_SCALE,
    exactly."""
    from jax.experimental import pallas as pl
    from minimax_jax.ops import triton_common
    from quant import nvfp4
    codes = jnp.tile(jnp.arange(256, dtype=jnp.uint8), (16, 1))                                      # [16, 256]
    scale_values = np.asarray([2.0 ** -9, 2.0 ** -6, 0.01, 1.0, 1.75, 3.0, 100.0, 448.0], np.float32)
    scales = jnp.asarray(np.repeat(scale_values, 2)[:, None].repeat(256, 1)).astype(jnp.float8_e4m3fn)  # by row

    def kernel(c_ref, s_ref, low_ref, high_ref):
        low_ref[...], high_ref[...] = triton_common.widen_scaled_nibbles(
            c_ref[...], triton_common.scale_operand(s_ref[...]), ptx=ON_GPU)
    out = jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)
    low, high = pl.pallas_call(kernel, out_shape=(out, out), interpret=not ON_GPU)(codes, scales)
    s32 = np.asarray(scales.astype(jnp.float32)) / triton_common.SCALED_NIBBLE_SCALE
    np.testing.assert_array_equal(np.asarray(low, np.float32), np.asarray(nvfp4.decode_e2m1(codes)) * s32)
    np.testing.assert_array_equal(np.asarray(high, np.float32), np.asarray(nvfp4.decode_e2m1(codes >> 4)) * s32)


def nvfp4_experts(rng, shape, parts):
    """Random weights [L, E, N, K] quantised as ModelOpt does, one global scale per part of N."""
    from quant import nvfp4
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    g = (np.abs(w).reshape(*shape[:2], parts, -1).max(-1) / (6 * 448)).astype(np.float32)         # [L, E, G]
    q = nvfp4.quantize(w, np.repeat(g, shape[2] // parts, axis=-1)[..., None])
    return q.codes, q.scales, jnp.asarray(g)


@pytest.mark.parametrize("splits,wrapping_scales", [(1, False), (2, False), (2, True)])
def test_nvfp4_pair_products_equal_the_reference(splits, wrapping_scales, monkeypatch):
    """Pair r reads row r // 2 against its expert's codes, E4M3 scales and the global scale of
    its half of N (a gate/up pair's two tensors); an expert id out of range reads expert 0.
    Scales the kernel would read at wrapped offsets are gathered for the pairs first."""
    from minimax_jax.ops import triton_common
    rng = np.random.RandomState(6)
    codes, scales, g = nvfp4_experts(rng, (2, 3, 64, 1024), parts=2)
    if wrapping_scales:
        monkeypatch.setattr(triton_common, "offsets_wrap", lambda a: a.dtype == jnp.float8_e4m3fn)
    rows = jnp.asarray(rng.standard_normal((2, 1024)), jnp.bfloat16)
    experts = jnp.asarray([2, 0, 1, 7], jnp.int32)
    out = pair_experts.pair_products_nvfp4(rows, codes, scales, g, 1, experts, pairs_per_row=2, splits=splits,
                                           block_n=16, interpret=not ON_GPU)
    ref = pair_experts.reference_nvfp4(jnp.repeat(rows, 2, axis=0), codes, scales, g, 1,
                                       jnp.asarray([2, 0, 1, 0], jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    assert np.abs(np.asarray(ref[:, :32]) - np.asarray(ref[:, 32:])).max() > 0.1 * float(jnp.abs(ref).max())


def test_nvfp4_pairs_read_in_place_equal_the_per_pair_path_on_dequantised_experts():
    """`test_fp8_pairs_read_in_place_equal_the_per_pair_path_on_dequantised_experts` for NVFP4
    experts as `model.Experts` holds them."""
    from quant import nvfp4
    rng = np.random.RandomState(7)
    layers, experts, hidden, inter = 2, 4, 256, 256
    c13, s13, g13 = nvfp4_experts(rng, (layers, experts, 2 * inter, hidden), parts=2)
    c2, s2, g2 = nvfp4_experts(rng, (layers, experts, hidden, inter), parts=1)
    w13 = (c13.reshape(layers, experts, 2, inter, -1), s13.reshape(layers, experts, 2, inter, -1), g13)
    w2 = (c2, s2, g2[..., 0])
    x = jnp.asarray(rng.standard_normal((2, hidden)), jnp.float32)
    expert_ids = jnp.asarray([[5, 2], [3, 9]], jnp.int32)            # global ids; this device holds 2..5
    weights = jnp.asarray([[0.7, 0.3], [0.6, 0.4]], jnp.float32)
    local = expert_ids - 2
    mine = (local >= 0) & (local < experts)
    out = moe.per_pair_experts_nvfp4(x, expert_ids, weights, local, mine, *w13, *w2, 1, interpret=not ON_GPU)
    picked = jnp.where(mine, local, 0).reshape(-1)
    dense13 = nvfp4.dequantize(nvfp4.NVFP4Array(w13[0][1], w13[1][1], w13[2][1][..., None, None]))
    dense2 = nvfp4.dequantize(nvfp4.NVFP4Array(w2[0][1], w2[1][1], w2[2][1][..., None, None]))
    ref = moe.per_pair_experts(x, expert_ids, weights, dense13[picked].transpose(0, 3, 1, 2),
                               dense2[picked].transpose(0, 2, 1), mine)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    other = moe.per_pair_experts_nvfp4(x, expert_ids, weights, local, mine, *w13, *w2, 0, interpret=not ON_GPU)
    assert not np.allclose(np.asarray(other), np.asarray(ref), atol=1e-2 * float(jnp.abs(ref).max()))


def test_nvfp4_pairs_are_read_in_place_only_in_whole_blocks_of_channels():
    codes = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.uint8)  # noqa: E731
    assert pair_experts.supports_nvfp4(codes(62, 256, 2, 384, 1536), codes(62, 256, 3072, 192))      # TP4
    assert not pair_experts.supports_nvfp4(codes(2, 256, 2, 48, 1536), codes(2, 256, 3072, 24))      # a share of 48


def test_nvfp4_pair_kernel_lowers_for_gpus_at_full_size():
    """One request's gate/up pairs at 62 layers on one device (256 experts of 2 x 1536 rows), and
    on TP4, whose 2.3e9 scale bytes the kernel would read at wrapped offsets (gathered first)."""
    from minimax_jax.ops import triton_common
    for inter in (1536, 384):
        args = (jax.ShapeDtypeStruct((1, 3072), jnp.bfloat16),
                jax.ShapeDtypeStruct((62, 256, 2 * inter, 1536), jnp.uint8),
                jax.ShapeDtypeStruct((62, 256, 2 * inter, 192), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((62, 256, 2), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
                jax.ShapeDtypeStruct((8,), jnp.int32))
        f = jax.jit(functools.partial(pair_experts.pair_products_nvfp4, pairs_per_row=8))
        assert "xla.gpu.triton" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert triton_common.offsets_wrap(args[2]) == (inter == 384)


@pytest.mark.parametrize("widen,block_k", [("ptx", 128), ("scaled", 128), ("scaled", 256)])
def test_nvfp4_grouped_gemm_equals_the_reference_and_zeroes_tiles_of_no_expert(widen, block_k):
    from minimax_jax.ops import grouped_gemm_nvfp4
    rng = np.random.RandomState(8)
    codes, scales, g = nvfp4_experts(rng, (2, 3, 256, 256), parts=2)
    rows = jnp.asarray(rng.standard_normal((4 * 16, 256)), jnp.bfloat16)
    groups = jnp.asarray([2, 0, 3, 1], jnp.int32)                  # 3: rows past the groups
    out = grouped_gemm_nvfp4.aligned_gemm_nvfp4(rows, groups, codes, scales, g, 1, block_m=16, widen=widen,
                                                block_k=block_k, interpret=not ON_GPU)
    ref = grouped_gemm_nvfp4.reference(rows, groups, codes, scales, g, 1, block_m=16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)
    assert not np.asarray(out[32:48]).any() and np.abs(np.asarray(ref[:32])).max() > 1


def test_nvfp4_experts_through_the_grouped_kernel_equal_the_dequantised_reference(monkeypatch):
    """6 tokens' pairs over 4 NVFP4 experts (tiles of 16 rows, scaled widening 256 deep), 40
    tokens' (64 rows, fp32 widening) and 300 tokens' (128 rows, scaled, 256 columns), the layer
    read in place from 2 stacked layers; the kernel's bf16 products against XLA's on the
    dequantised experts."""
    from flax import nnx
    from minimax_jax.config import preset
    from minimax_jax.model import Experts
    cfg = dataclasses.replace(preset("tiny"), hidden_size=256, intermediate_size=256, num_experts=4)
    layers = [Experts(cfg, jnp.bfloat16, nnx.Rngs(i), expert_format="nvfp4") for i in range(2)]
    graphdef, _ = nnx.split(layers[0])
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(e)[1] for e in layers]))
    stacked.kernel, layers[1].kernel = "triton-nvfp4", "xla"
    calls, aligned = [], moe.grouped_gemm_nvfp4.aligned_gemm_nvfp4
    monkeypatch.setattr(moe.grouped_gemm_nvfp4, "aligned_gemm_nvfp4", lambda *a, **k: calls.append(k) or aligned(*a, **k))
    rng = np.random.RandomState(15)
    tiles = {16: dict(block_n=128, block_k=256, widen="scaled"), 64: dict(block_n=128, widen="ptx"),
             128: dict(block_n=256, widen="scaled")}
    for tokens, tile in ((6, 16), (40, 64), (300, 128)):
        assert moe.nvfp4_block_rows(2 * tokens, 4) == tile
        calls.clear()
        x = jnp.asarray(rng.standard_normal((tokens, 256)), jnp.bfloat16)
        ids = jnp.asarray(rng.randint(0, 4, (tokens, 2)), jnp.int32)
        weights = jnp.asarray(rng.random((tokens, 2)), jnp.float32)
        got = np.asarray(stacked(x, ids, weights, first_expert=0, layer=jnp.int32(1)))
        want = np.asarray(layers[1](x, ids, weights, first_expert=0))
        assert len(calls) == 2 and all(c["block_m"] == tile and c.items() >= tiles[tile].items() for c in calls)
        assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()


@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_nvfp4_grouped_kernel_lowers_for_gpus_at_full_size(block_m):
    """A W1 DEP4 prefill step's gate/up rows against 62 layers of 64 local experts, and TP4's
    gate/up product, in each tile size's options (`moe.nvfp4_tile`): both hold 2-4 GiB of scales,
    sliced to the layer first, and read the codes in place."""
    from minimax_jax.ops import grouped_gemm_nvfp4, triton_common
    m = 8192 * 8 + 64 * 64
    for e, n, k in ((64, 3072, 3072), (256, 768, 3072)):
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m // block_m,), jnp.int32),
                jax.ShapeDtypeStruct((62, e, n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((62, e, n, k // 16),
                                                                                     jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((62, e, 1), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
        f = jax.jit(functools.partial(grouped_gemm_nvfp4.aligned_gemm_nvfp4, block_m=block_m,
                                      **moe.nvfp4_tile(block_m, n, k)))
        assert "xla.gpu.triton" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert triton_common.offsets_wrap(args[3]) and not triton_common.offsets_wrap(args[2])


@pytest.mark.parametrize("n, k, splits", [(3072, 3072, 1), (3072, 1536, 1), (1536, 3072, 2), (3072, 768, 1),
                                          (768, 3072, 4), (3072, 384, 1)])
def test_pair_splits_give_one_tokens_pairs_the_split_measured_fastest_at_each_tp_shape(n, k, splits):
    # gate/up and down on TP1, TP2, TP4 (docs/benchmarks.md runs FI, FJ): about 768 programs,
    # and never a split that does not divide K's blocks (TP4's down: 3 blocks)
    assert pair_experts.pair_splits(k // 128, 8 * (n // 32)) == splits
