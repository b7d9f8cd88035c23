"""FP8 E4M3: blockwise (released MiniMax-M2.5 format) and per-channel, against ml_dtypes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quant import fp8

F32 = np.float32
SETTINGS = settings(max_examples=50, deadline=None)
SLACK = 1 + 1e-5   # float32 rounding of w / scale and of the dequantised product
SMALL_BLOCK = (4, 8)
quantize_small = jax.jit(lambda w: fp8.quantize_blockwise(w, SMALL_BLOCK))


def reference_blockwise(w: np.ndarray, block):
    """(w_fp8, scale_inv) from the format description, in numpy + ml_dtypes."""
    (n, k), (bn, bk) = w.shape[-2:], block
    nb, kb = -(-n // bn), -(-k // bk)
    scale_inv = np.ones((*w.shape[:-2], nb, kb), F32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(nb):
        for j in range(kb):
            tile = w[..., i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].astype(F32)
            amax = np.max(np.abs(tile), axis=(-2, -1))
            s = np.where(amax > 0, amax / F32(448), F32(1)).astype(F32)
            scale_inv[..., i, j] = s
            y = np.clip(tile / s[..., None, None], -448, 448)
            q[..., i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = y.astype(ml_dtypes.float8_e4m3fn)
    return q, scale_inv


def expand(scale_inv: np.ndarray, shape, block) -> np.ndarray:
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float64), block[0], -2), block[1], -1)
    return s[..., :shape[-2], :shape[-1]]


def fp8_bound(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """max(2^-4 |w|, 2^-10 scale) per element; `scale` already broadcast to w."""
    return np.maximum(2.0**-4 * np.abs(w.astype(np.float64)), 2.0**-10 * scale)


def abs_error(w: np.ndarray, w_hat) -> np.ndarray:
    return np.abs(np.asarray(w_hat, np.float64) - w.astype(np.float64))


_magnitude = st.floats(-6, 6).map(lambda e: float(F32(10.0**e)))
_element = st.one_of(st.just(0.0), _magnitude, _magnitude.map(lambda v: -v))


@st.composite
def wide_range_weights(draw):
    """[N, K] f32, N and K not multiples of the (4, 8) block, |w| in 1e-6..1e6, zeros."""
    shape = draw(st.sampled_from([(4, 8), (5, 9), (9, 17), (2, 3, 11)]))
    return draw(hnp.arrays(np.float32, shape, elements=_element))


# -- bit-exactness ----------------------------------------------------------------------------------


@SETTINGS
@given(wide_range_weights())
def test_blockwise_bit_identical_to_ml_dtypes_casts(w):
    q, scale_inv = quantize_small(w)
    ref_q, ref_scale = reference_blockwise(w, SMALL_BLOCK)
    np.testing.assert_array_equal(np.asarray(scale_inv), ref_scale)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_q.view(np.uint8))


@SETTINGS
@given(wide_range_weights())
def test_blockwise_error_bound_on_wide_range_data(w):
    q, scale_inv = quantize_small(w)
    err = abs_error(w, fp8.dequantize_blockwise(q, scale_inv, block=SMALL_BLOCK))
    assert np.all(err <= fp8_bound(w, expand(scale_inv, w.shape, SMALL_BLOCK)) * SLACK)


def test_default_block_bit_identical_on_partial_edge_blocks():
    w = np.random.default_rng(0).standard_normal((130, 257)).astype(F32)
    q, scale_inv = fp8.quantize_blockwise(w)
    ref_q, ref_scale = reference_blockwise(w, (128, 128))
    assert scale_inv.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(scale_inv), ref_scale)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_q.view(np.uint8))


# -- error bounds on Gaussian data --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (2, 130, 129)])
def test_blockwise_round_trip_bounds_on_gaussian_data(shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(F32)
    q, scale_inv = fp8.quantize_blockwise(w)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == jnp.float32
    assert scale_inv.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    err = abs_error(w, fp8.dequantize_blockwise(q, scale_inv))
    assert np.all(err <= fp8_bound(w, expand(scale_inv, w.shape, (128, 128))) * SLACK)
    assert np.linalg.norm(err) / np.linalg.norm(w) < 0.03


def test_blockwise_bound_covers_subnormal_range():
    w = np.random.default_rng(2).standard_normal((128, 128)).astype(F32) * F32(1e-2)
    w[0, 0] = 1e3        # the rest scale to |y| ~ 2^-8: e4m3's subnormal range
    q, scale_inv = fp8.quantize_blockwise(w)
    err = abs_error(w, fp8.dequantize_blockwise(q, scale_inv))
    bound = fp8_bound(w, expand(scale_inv, w.shape, (128, 128)))
    assert np.all(err <= bound * SLACK)
    assert np.max(err / bound) > 0.5    # the 2^-10 * scale term is what holds here


def test_per_channel_round_trip_bounds_on_gaussian_data():
    w = np.random.default_rng(3).standard_normal((3, 200, 300)).astype(F32)
    w *= (10.0 ** np.random.default_rng(4).uniform(-3, 3, (3, 200, 1))).astype(F32)
    q, scale = fp8.quantize_per_channel(w)
    assert q.dtype == jnp.float8_e4m3fn and scale.dtype == jnp.float32
    assert scale.shape == (3, 200, 1)
    np.testing.assert_array_equal(np.asarray(scale), np.max(np.abs(w), -1, keepdims=True) / F32(448))
    err = abs_error(w, fp8.dequantize_per_channel(q, scale))
    assert np.all(err <= fp8_bound(w, np.asarray(scale, np.float64)) * SLACK)
    assert np.linalg.norm(err / np.abs(w).max(-1, keepdims=True)) / np.linalg.norm(
        w / np.abs(w).max(-1, keepdims=True)) < 0.03


def test_token_groups_round_trip_within_the_bound_of_their_own_128_columns():
    """The dynamic activation scheme: one scale per row and 128 columns, so a group of large
    values leaves its row's other groups at their own precision."""
    x = np.random.default_rng(6).standard_normal((5, 384)).astype(F32)
    x *= (10.0 ** np.random.default_rng(7).uniform(-3, 3, (5, 3))).repeat(128, axis=1).astype(F32)
    x[2, 128:256] = 0.0                                          # an all-zero group: scale 1
    q, scale = fp8.quantize_groups(x)
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (5, 3)
    want = np.abs(x).reshape(5, 3, 128).max(-1) / F32(448)
    want[2, 1] = 1.0
    np.testing.assert_allclose(np.asarray(scale), want, rtol=1e-6)
    err = abs_error(x, fp8.dequantize_groups(q, scale))
    assert np.all(err <= fp8_bound(x, np.repeat(np.asarray(scale, np.float64), 128, axis=1)) * SLACK)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.quantize_groups(np.ones((2, 100), F32))


def test_per_channel_along_other_axis_keeps_that_axis():
    w = np.random.default_rng(5).standard_normal((6, 10)).astype(F32)
    q, scale = fp8.quantize_per_channel(w, axis=0)
    assert scale.shape == (1, 10)
    err = abs_error(w, fp8.dequantize_per_channel(q, scale))
    assert np.all(err <= fp8_bound(w, np.broadcast_to(np.asarray(scale, np.float64), w.shape)) * SLACK)


def test_requantize_blockwise_to_per_channel_obeys_per_channel_bound():
    w = np.random.default_rng(6).standard_normal((200, 300)).astype(F32)
    w[:, 128:256] *= 8.0     # row blocks with different scales, so the second rounding is real
    q, scale_inv = fp8.quantize_blockwise(w)
    w_block = np.asarray(fp8.dequantize_blockwise(q, scale_inv))
    q2, scale = fp8.requantize_blockwise_to_per_channel(q, scale_inv)
    assert q2.dtype == jnp.float8_e4m3fn and q2.shape == w.shape and scale.shape == (200, 1)
    w_chan = fp8.dequantize_per_channel(q2, scale)
    err = abs_error(w_block, w_chan)
    assert np.any(err > 0)
    assert np.all(err <= fp8_bound(w_block, np.asarray(scale, np.float64)) * SLACK)


# -- zeros, inf, NaN, API ----------------------------------------------------------------------------


def test_all_zero_block_has_scale_one_and_dequantizes_to_zeros():
    w = np.zeros((8, 16), F32)
    w[4:, 8:] = 1.5
    q, scale_inv = fp8.quantize_blockwise(w, SMALL_BLOCK)
    np.testing.assert_array_equal(np.asarray(scale_inv), F32([[1, 1], [1, F32(1.5) / F32(448)]]))
    np.testing.assert_array_equal(np.asarray(fp8.dequantize_blockwise(q, scale_inv, block=SMALL_BLOCK)), w)
    q, scale = fp8.quantize_per_channel(np.zeros((3, 4), F32))
    assert np.all(np.asarray(scale) == 1) and np.all(np.asarray(fp8.dequantize_per_channel(q, scale)) == 0)


def test_inf_saturates_and_nan_stays_in_its_element():
    w = F32([[np.inf, -np.inf, np.nan, 1.0, 0.5, 0, 0, 0], [np.inf] + [0] * 7])
    q, scale_inv = fp8.quantize_blockwise(w, (1, 8))
    np.testing.assert_array_equal(np.asarray(scale_inv), F32([[1 / 448], [1]]))
    out = np.asarray(fp8.dequantize_blockwise(q, scale_inv, block=(1, 8)))
    assert out[0, :2].tolist() == [1.0, -1.0] and np.isnan(out[0, 2])
    assert out[0, 3:].tolist() == [1.0, 0.5, 0, 0, 0]
    assert out[1].tolist() == [448.0] + [0.0] * 7


def test_dequantize_blockwise_rejects_mismatched_scale_shape():
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        fp8.dequantize_blockwise(np.zeros((130, 257), ml_dtypes.float8_e4m3fn), np.ones((1, 3), F32))


def test_blockwise_rejects_1d_input():
    with pytest.raises(ValueError, match="\\[..., N, K\\]"):
        fp8.quantize_blockwise(np.ones(16, F32))


def test_jit_matches_eager_and_dtype_argument_is_honoured():
    w = jnp.asarray(np.random.default_rng(7).standard_normal((130, 200)), jnp.bfloat16)
    q, s = jax.jit(fp8.quantize_blockwise)(w)
    q_e, s_e = fp8.quantize_blockwise(w)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q_e).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_e))
    out = jax.jit(fp8.dequantize_blockwise, static_argnames="dtype")(q, s, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16


def test_accepts_ml_dtypes_numpy_fp8_input():
    w = np.random.default_rng(8).standard_normal((64, 64)).astype(F32)
    q, s = fp8.quantize_blockwise(w)
    host_q = np.asarray(q)                    # what a safetensors reader hands over
    assert host_q.dtype == ml_dtypes.float8_e4m3fn
    out = fp8.dequantize_blockwise(host_q, np.asarray(s), dtype=ml_dtypes.bfloat16)
    assert out.dtype == jnp.bfloat16
