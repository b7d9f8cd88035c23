"""The row gather into group-aligned buffers: the kernel writes every row that has a source, and
the MoE block gives the same result whatever the rows without one hold. The Triton kernel runs
under Pallas's interpreter here and is lowered for the CUDA platform; `JAX_PLATFORMS=cuda
MINIMAX_JAX_KERNEL_TESTS=gpu pytest tests/test_row_gather.py` compiles it on a GPU."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.ops import moe, row_gather
from quant import fp8
from sharding.collectives import pack_rows, packed_columns
from tests.test_moe_ops import INTERPRET, RowBucketCase

ON_GPU = os.environ.get("MINIMAX_JAX_KERNEL_TESTS") == "gpu"


def _index(rng: np.random.RandomState, m: int, n: int) -> jax.Array:
    """m rows, about half of them with a source in [0, n); the rest past either end."""
    index = rng.randint(0, n, m)
    no_source = rng.rand(m) < 0.5
    index[no_source] = rng.choice([-1, n, n + 7], no_source.sum())
    return jnp.asarray(index, jnp.int32)


def test_kernel_writes_each_sourced_row_of_every_segment():
    """A packed table of bytes cut into segments (a width over the kernel's chunk, one that is
    not a power of two), an FP8 table and an fp32 one, gathered in one call."""
    rng = np.random.RandomState(0)
    n, m = 40, 96
    words = jnp.asarray(rng.randint(0, 256, (n, 1100 + 96 + 8)), jnp.uint8)
    codes = jnp.asarray(rng.standard_normal((n, 256)), jnp.float32).astype(jnp.float8_e4m3fn)
    scales = jnp.asarray(rng.standard_normal((n, 24)), jnp.float32)
    index = _index(rng, m, n)
    segments = [(0, 0, 1100), (0, 1100, 96), (1, 0, 256), (2, 0, 24)]
    out = row_gather.gather_rows([words, codes, scales], index, segments, interpret=not ON_GPU)
    expected = row_gather.reference([words, codes, scales], index, segments)
    sourced = (np.asarray(index) >= 0) & (np.asarray(index) < n)
    assert 0 < sourced.sum() < m
    for got, want in zip(out, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32))[sourced],
                                      np.asarray(want.astype(jnp.float32))[sourced])


def test_kernel_refuses_what_it_cannot_gather():
    """And tells moe to gather with XLA instead: an FP8 output of over 2**31 entries (a prefill
    step's largest row bucket on DEP4 at 32768 tokens a rank) would be stored at wrapped offsets."""
    codes = jax.ShapeDtypeStruct((32768, 3072), jnp.float8_e4m3fn)
    assert row_gather.supported([codes], 17920 * 16)
    assert not row_gather.supported([codes], 1056768)
    assert not row_gather.supported([jax.ShapeDtypeStruct((8, 16), jnp.float4_e2m1fn)], 16)
    assert not row_gather.supported([codes], 17920 * 16 + 8)      # not whole programs of 16 rows
    table = jnp.zeros((8, 16), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        row_gather.gather_rows([table], jnp.zeros((20,), jnp.int32))
    with pytest.raises(ValueError, match="lies outside"):
        row_gather.gather_rows([table], jnp.zeros((16,), jnp.int32), [(0, 8, 9)])
    with pytest.raises(ValueError, match="one row count"):
        row_gather.gather_rows([table, jnp.zeros((9, 16))], jnp.zeros((16,), jnp.int32))


@pytest.mark.parametrize("packed", [True, False])
def test_kernel_lowers_for_gpus_at_w1s_decode_size(packed):
    """A DEP4 rank of W1: 1212 gathered tokens into 17920 aligned rows, as the 3232 bytes an FP8
    dispatch packs, or as FP8 codes and fp32 scales."""
    index = jax.ShapeDtypeStruct((17920,), jnp.int32)
    if packed:
        args = (jax.ShapeDtypeStruct((1212, 3232), jnp.uint8), index)
        segments = [(0, 0, 3072), (0, 3072, 96)]
        gather = lambda words, index: row_gather.gather_rows([words], index, segments)  # noqa: E731
    else:
        args = (jax.ShapeDtypeStruct((1212, 3072), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((1212, 24), jnp.float32),
                index)
        gather = lambda codes, scales, index: row_gather.gather_rows([codes, scales], index)  # noqa: E731
    text = jax.jit(gather).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text


def _kernel_leaving_garbage(monkeypatch):
    """moe's aligned gathers through the kernel, with every row it does not write set to NaN
    (FP8 and float tables) or to 0xFF bytes (the NaN of e4m3), as undefined rows might be."""
    gather = row_gather.gather_rows
    calls = []

    def garbage(a):     # all bits set: NaN in floats (e4m3's too, as bytes)
        if jnp.issubdtype(a.dtype, jnp.unsignedinteger):
            return jnp.full_like(a, jnp.iinfo(a.dtype).max)
        return jnp.full_like(a, jnp.nan)

    def gather_with_garbage(tables, index, segments=None, **kwargs):
        out = gather(tables, index, segments, interpret=not ON_GPU, **kwargs)
        sourced = ((index >= 0) & (index < tables[0].shape[0]))[:, None]
        calls.append(len(out))
        return [jnp.where(sourced, a, garbage(a)) for a in out]
    monkeypatch.setattr(moe, "kernel_gathers_rows", lambda: True)
    monkeypatch.setattr(row_gather, "gather_rows", gather_with_garbage)
    return calls


@pytest.mark.parametrize("owner_of_all", [False, True])
def test_routed_experts_ignore_what_aligned_rows_without_a_source_hold(owner_of_all, monkeypatch):
    """Padding rows inside a group's blocks and blocks past the groups, in the smallest row
    bucket (a quarter of the pairs local) and the largest (every pair local)."""
    case = RowBucketCase.make(owner_of_all)
    zeros = case.aligned()
    calls = _kernel_leaving_garbage(monkeypatch)
    garbage = case.aligned()
    assert calls and np.abs(np.asarray(zeros)).max() > 0
    np.testing.assert_array_equal(np.asarray(garbage), np.asarray(zeros))


def test_packed_fp8_tokens_gathered_by_columns_give_the_w8a8_kernels_result(monkeypatch):
    """What an FP8 dispatch delivers (codes, scales, ids and weights in one array of bytes)
    through the W8A8 kernel with SwiGLU fused, the rows without a source NaN: the same as the
    tokens rounded inside routed_experts and gathered by XLA."""
    rng = np.random.RandomState(17)
    n, k, local, h, i, first = 40, 2, 4, 256, 256, 4
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.bfloat16)
    ids = jnp.asarray(rng.randint(0, 12, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13, s13 = fp8.quantize_blockwise(rng.standard_normal((local, 2, i, h)))
    w2, s2 = fp8.quantize_blockwise(rng.standard_normal((local, h, i)))
    matmuls = moe.fp8_matmuls(w13, s13, w2, s2, kernel="mosaic-ws-w8a8", fuse_swiglu=True, **INTERPRET)
    expected = moe.routed_experts(x, ids, weights, local, first, matmuls)
    rounded = matmuls.prepare(x)
    arrays = [*rounded, ids, weights]
    words = pack_rows(arrays)
    like = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rounded]
    packed = moe.PackedTokens(words, *packed_columns(like, words.dtype, jax.tree.structure(rounded)))
    calls = _kernel_leaving_garbage(monkeypatch)
    got = moe.routed_experts(packed, ids, weights, local, first, matmuls, prepared=True)
    assert calls == [2] and np.abs(np.asarray(expected)).max() > 0      # codes and scales, not ids or weights
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
