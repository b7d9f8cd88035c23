"""NVFP4: bit-exactness against ml_dtypes, nibble order, error bounds, edge cases, activations."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quant import nvfp4

F32 = np.float32
SETTINGS = settings(max_examples=50, deadline=None)
# Jitted entry points keep the tests fast (one compile per shape instead of one per op).
quantize_jit = jax.jit(nvfp4.quantize)
dequantize_jit = jax.jit(nvfp4.dequantize, static_argnames="dtype")
quantize_activations_jit = jax.jit(nvfp4.quantize_activations)
dequantize_activations_jit = jax.jit(nvfp4.dequantize_activations, static_argnames=("hidden", "dtype"))


# -- reference (numpy + ml_dtypes), written from the format description ---------------------------


def reference_quantize(x: np.ndarray, g=None):
    """(codes uint8 [..., K] unpacked, scales e4m3 [..., K/16], g f32) for finite x."""
    x = x.astype(F32)
    if g is None:
        g = F32(np.max(np.abs(x))) / F32(2688)
        g = g if g > 0 else F32(1)
    g = np.asarray(g, F32)
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    g_b = g[..., None]
    amax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    scales = np.minimum(amax / (F32(6) * g_b), F32(448)).astype(ml_dtypes.float8_e4m3fn)
    denom = scales.astype(F32) * g_b
    y = np.where(denom > 0, blocks / np.where(denom > 0, denom, F32(1)), F32(0)).astype(F32)
    codes = y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return codes.reshape(x.shape), scales[..., 0], g


def error_bounds(x: np.ndarray, q: nvfp4.NVFP4Array):
    """(coarse bound for every element, refined bound or inf where the block scale is subnormal)."""
    x64 = x.astype(np.float64)
    g = np.asarray(q.global_scale, np.float64)
    blocks = x64.reshape(*x.shape[:-1], -1, 16)
    amax_b = np.max(np.abs(blocks), axis=-1, keepdims=True)
    coarse = 17 / 96 * amax_b + 6 / 1024 * g[..., None]
    s = np.asarray(q.scales).astype(np.float64)[..., None]
    refined = np.maximum(np.abs(blocks) / 5, s * g[..., None] / 4)
    refined = np.where(s >= 2.0**-6, refined, np.inf)
    shape = x.shape
    return np.broadcast_to(coarse, blocks.shape).reshape(shape), refined.reshape(shape)


def abs_error(x: np.ndarray, q: nvfp4.NVFP4Array) -> np.ndarray:
    return np.abs(np.asarray(dequantize_jit(q), np.float64) - x.astype(np.float64))


SLACK = 1 + 1e-5   # float32 rounding of the intermediate products


# -- strategies -----------------------------------------------------------------------------------

_magnitude = st.floats(-6, 6).map(lambda e: float(F32(10.0**e)))
_element = st.one_of(st.just(0.0), _magnitude, _magnitude.map(lambda v: -v))


@st.composite
def wide_range_arrays(draw):
    """[rows, K] f32 with |x| in 1e-6..1e6, mixed signs, zeros and some all-zero blocks."""
    rows, k = draw(st.sampled_from([(1, 16), (2, 32), (3, 64)]))
    x = draw(hnp.arrays(np.float32, (rows, k), elements=_element))
    zero_blocks = draw(hnp.arrays(np.bool_, (rows, k // 16, 1)))
    return np.where(zero_blocks, F32(0), x.reshape(rows, -1, 16)).reshape(rows, k).astype(F32)


# -- bit-exactness --------------------------------------------------------------------------------


@SETTINGS
@given(wide_range_arrays())
def test_codes_and_scales_bit_identical_to_ml_dtypes_casts(x):
    q = quantize_jit(x)
    codes, scales, g = reference_quantize(x)
    np.testing.assert_array_equal(np.asarray(q.global_scale), g)
    np.testing.assert_array_equal(np.asarray(nvfp4.scales_to_bytes(q.scales)), scales.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_e2m1(q.codes)), codes)
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(F32).reshape(*x.shape[:-1], -1, 16)
    expected = (values * scales.astype(F32)[..., None]) * g
    np.testing.assert_array_equal(np.asarray(dequantize_jit(q)), expected.reshape(x.shape))


@SETTINGS
@given(wide_range_arrays())
def test_per_row_global_scale_bit_identical_to_ml_dtypes_casts(x):
    g = nvfp4.compute_global_scale(x, per_row=True)
    q = quantize_jit(x, g)
    codes, scales, _ = reference_quantize(x, np.asarray(g))
    np.testing.assert_array_equal(np.asarray(nvfp4.scales_to_bytes(q.scales)), scales.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_e2m1(q.codes)), codes)


@SETTINGS
@given(wide_range_arrays())
def test_error_bound_holds_on_wide_range_data(x):
    q = quantize_jit(x)
    coarse, refined = error_bounds(x, q)
    err = abs_error(x, q)
    assert np.all(err <= coarse * SLACK)
    assert np.all(err <= refined * SLACK)


def test_ties_round_to_the_even_code():
    ties = F32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = np.concatenate([F32([6.0]), ties, -ties, F32([0.0])])   # amax 6 and g=1: scale exactly 1
    q = quantize_jit(x, 1.0)
    codes = np.asarray(nvfp4.unpack_e2m1(q.codes))
    expected = np.array([7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0], np.uint8)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(codes, x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF)


def test_ties_under_jit_use_the_exactly_divided_value():
    # Per-row g with 20 significant bits, so every t * g below is exact and x / (s * g) is exactly
    # the tie t; a reciprocal-multiply would miss the tie by an ulp in about half the rows.
    rng = np.random.default_rng(8)
    g = ((2**20 + rng.integers(0, 2**20, (256, 1))) / 2.0**21).astype(F32)
    ties = F32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    row = np.concatenate([F32([6.0]), ties, -ties, F32([0.0])])
    x = (row[None, :] * g).astype(F32)                 # block amax 6 g: scale exactly 1
    q = quantize_jit(x, g)
    assert np.all(np.asarray(q.scales).astype(F32) == 1)
    expected = np.array([7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0], np.uint8)
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_e2m1(q.codes)), np.tile(expected, (256, 1)))


def test_encode_e2m1_saturates_large_values_like_ml_dtypes():
    y = F32([6.5, 7.0, 1e30, np.inf, -7.0, -np.inf])
    np.testing.assert_array_equal(np.asarray(nvfp4.encode_e2m1(y)),
                                  y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF)


# -- nibble order -----------------------------------------------------------------------------------


def test_even_column_goes_to_low_nibble_hand_worked():
    x = np.zeros(16, F32)
    x[:3] = [0.5, -1.0, 6.0]            # block amax 6 with g=1 gives scale 1.0 (byte 0x38)
    q = quantize_jit(x, 1.0)
    # 0.5 -> code 1 (even column, low nibble), -1.0 -> code 0b1010 (odd column, high nibble)
    assert np.asarray(q.codes).tolist() == [0xA1, 0x07, 0, 0, 0, 0, 0, 0]
    assert np.asarray(nvfp4.scales_to_bytes(q.scales)).tolist() == [0x38]
    np.testing.assert_array_equal(np.asarray(dequantize_jit(q)), x)

    swapped = (np.asarray(q.codes) >> 4) | ((np.asarray(q.codes) & 0xF) << 4)
    wrong = dequantize_jit(nvfp4.NVFP4Array(jnp.asarray(swapped, jnp.uint8), q.scales, q.global_scale))
    assert np.asarray(wrong)[:4].tolist() == [-1.0, 0.5, 0.0, 6.0]


def test_pack_unpack_round_trip_and_explicit_bytes():
    codes = np.random.default_rng(0).integers(0, 16, (3, 32), dtype=np.uint8)
    packed = np.asarray(nvfp4.pack_e2m1(codes))
    assert packed.shape == (3, 16) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, codes[:, 0::2] | (codes[:, 1::2] << 4))
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_e2m1(packed)), codes)
    assert np.asarray(nvfp4.pack_e2m1(np.array([1, 10], np.uint8))).tolist() == [0xA1]


def test_scale_bytes_round_trip():
    raw = np.arange(256, dtype=np.uint8)
    scales = nvfp4.scales_from_bytes(raw)
    assert scales.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(nvfp4.scales_to_bytes(scales)), raw)


# -- error bounds on Gaussian data --------------------------------------------------------------------


def test_round_trip_bounds_on_gaussian_data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 1024)).astype(F32)
    q = quantize_jit(x)
    err = abs_error(x, q)
    coarse, refined = error_bounds(x, q)
    assert np.all(err <= coarse * SLACK)
    assert np.all(err <= refined * SLACK)
    relative = np.linalg.norm(err) / np.linalg.norm(x)
    assert 0.08 < relative < 0.1


def test_round_trip_bound_with_tiny_blocks_and_subnormal_scales():
    rng = np.random.default_rng(2)
    row_scale = (10.0 ** rng.uniform(-7, 0, (64, 1))).astype(F32)   # many blocks far below amax
    x = rng.standard_normal((64, 256)).astype(F32) * row_scale
    q = quantize_jit(x)
    assert np.any(np.asarray(q.scales).astype(F32) < 2.0**-6)
    coarse, refined = error_bounds(x, q)
    err = abs_error(x, q)
    assert np.all(err <= coarse * SLACK)
    assert np.all(err <= refined * SLACK)


# -- zeros, inf, NaN, shapes ---------------------------------------------------------------------------


def test_all_zero_block_dequantizes_to_exact_zeros():
    x = np.zeros((2, 32), F32)
    x[0, 16:] = np.linspace(-3, 3, 16)
    q = quantize_jit(x)
    assert np.asarray(nvfp4.scales_to_bytes(q.scales))[0, 0] == 0
    out = np.asarray(dequantize_jit(q))
    assert np.all(out[0, :16] == 0) and np.all(out[1] == 0)
    assert not np.any(np.isnan(out))


def test_all_zero_tensor_uses_global_scale_one():
    q = quantize_jit(np.zeros((4, 64), F32))
    assert float(q.global_scale) == 1.0
    assert np.all(np.asarray(dequantize_jit(q)) == 0)


def test_inf_saturates_to_largest_representable_magnitude():
    x = np.linspace(-1, 1, 32).astype(F32)
    x[3], x[20] = np.inf, -np.inf
    q = quantize_jit(x)
    finite_amax = np.max(np.abs(x[np.isfinite(x)]))
    assert float(q.global_scale) == F32(finite_amax) / F32(2688)
    out = np.asarray(dequantize_jit(q))
    assert out[3] == pytest.approx(finite_amax, rel=1e-6)
    assert out[20] == pytest.approx(-finite_amax, rel=1e-6)
    assert np.all(np.isfinite(out))


def test_nan_poisons_only_its_own_block():
    x = np.linspace(-1, 1, 48).astype(F32)
    x[20] = np.nan
    q = quantize_jit(x)
    assert float(q.global_scale) == F32(1.0) / F32(2688)
    assert np.asarray(nvfp4.scales_to_bytes(q.scales))[1] & 0x7F == 0x7F
    out = np.asarray(dequantize_jit(q))
    assert np.all(np.isnan(out[16:32]))
    clean = dequantize_jit(quantize_jit(np.where(np.isnan(x), 0, x), q.global_scale))
    np.testing.assert_array_equal(out[:16], np.asarray(clean)[:16])
    np.testing.assert_array_equal(out[32:], np.asarray(clean)[32:])


@pytest.mark.parametrize("k", [24, 8, 17])
def test_last_axis_not_multiple_of_16_raises(k):
    with pytest.raises(ValueError, match=f"multiple of 16, got K={k}"):
        quantize_jit(np.ones((2, k), F32))


def test_pack_odd_last_axis_raises():
    with pytest.raises(ValueError, match="even last axis K, got K=5"):
        nvfp4.pack_e2m1(np.zeros(5, np.uint8))


# -- API: dtypes, pytree, jit, shard_map --------------------------------------------------------------


def test_output_dtypes_shapes_and_logical_shape():
    q = quantize_jit(np.ones((2, 3, 64), F32))
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 3, 32)
    assert q.scales.dtype == jnp.float8_e4m3fn and q.scales.shape == (2, 3, 4)
    assert q.global_scale.dtype == jnp.float32 and q.global_scale.shape == ()
    assert q.shape == (2, 3, 64)
    assert dequantize_jit(q, jnp.bfloat16).dtype == jnp.bfloat16


def test_nvfp4_array_is_a_pytree_through_jit():
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(F32)
    assert len(jax.tree_util.tree_leaves(nvfp4.quantize(x))) == 3
    q_jit, q_eager = quantize_jit(x), nvfp4.quantize(x)
    for a, b in zip(jax.tree_util.tree_leaves(q_jit), jax.tree_util.tree_leaves(q_eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(nvfp4.dequantize)(q_jit)),
                                  np.asarray(nvfp4.dequantize(q_eager)))


def test_bf16_input_quantizes_like_its_f32_value():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 32)), jnp.bfloat16)
    a, b = quantize_jit(x), quantize_jit(np.asarray(x.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


def test_nbytes_per_param():
    assert nvfp4.nbytes_per_param() == 0.5625
    assert nvfp4.activation_payload_width(3072) == 1536 + 192


# -- activations ----------------------------------------------------------------------------------------


def test_activation_payload_round_trip_matches_per_token_quantize():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 5, 128)) * rng.uniform(0.01, 100, (3, 5, 1))).astype(F32)
    payload, g = quantize_activations_jit(x)
    assert payload.dtype == jnp.uint8 and payload.shape == (3, 5, 64 + 8)
    assert g.dtype == jnp.float32 and g.shape == (3, 5, 1)
    out = dequantize_activations_jit(payload, g, 128, jnp.float32)
    plain = jax.jit(functools.partial(nvfp4.quantize, exact=False))(x, g)
    expected = dequantize_jit(plain)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(payload[..., :64]), np.asarray(plain.codes))
    # plain division moves a code only within a last bit of a midpoint: the exact codes nearly all agree
    exact = quantize_jit(x, g)
    assert np.mean(np.asarray(exact.codes) != np.asarray(plain.codes)) < 1e-2
    assert np.linalg.norm(np.asarray(out) - x) / np.linalg.norm(x) < 0.1


def test_activation_quantization_of_a_token_ignores_the_rest_of_the_batch():
    x = np.random.default_rng(6).standard_normal((8, 64)).astype(F32)
    x[0] *= 1000.0
    payload, g = quantize_activations_jit(x)
    alone_payload, alone_g = quantize_activations_jit(x[3:4])
    np.testing.assert_array_equal(np.asarray(payload[3:4]), np.asarray(alone_payload))
    np.testing.assert_array_equal(np.asarray(g[3:4]), np.asarray(alone_g))


def test_dequantize_activations_rejects_wrong_payload_width():
    with pytest.raises(ValueError, match="hidden=64"):
        dequantize_activations_jit(np.zeros((2, 40), np.uint8), np.ones((2, 1), F32), 64)


def test_activation_round_trip_inside_shard_map():
    mesh = jax.make_mesh((1,), ("x",))
    spec = jax.sharding.PartitionSpec("x")

    def round_trip(x):
        payload, g = quantize_activations_jit(x)
        return dequantize_activations_jit(payload, g, x.shape[-1], jnp.float32)

    x = np.random.default_rng(7).standard_normal((4, 64)).astype(F32)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    f = jax.jit(jax.shard_map(round_trip, mesh=mesh, in_specs=spec, out_specs=spec))
    np.testing.assert_array_equal(np.asarray(f(sharded)), np.asarray(round_trip(x)))


def test_activations_to_fp8_groups_equal_rounding_the_dequantised_values_bit_for_bit():
    from quant import fp8
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 256)) * rng.uniform(1e-3, 1e3, (6, 1))).astype(F32)
    x[1] = 0.0                                   # a zero token: scales of 1, codes 0
    x[2, :128] = 0.0                             # a zero group beside a live one
    x[3, 5] = 1e4                                # one block far above the rest of its group
    payload, g = quantize_activations_jit(x)
    codes, scales = jax.jit(nvfp4.activations_to_fp8_groups, static_argnames=("hidden", "group"))(payload, g, 256)
    expected = fp8.quantize_groups(dequantize_activations_jit(payload, g, 256, jnp.float32), 128)
    assert codes.dtype == jnp.float8_e4m3fn and scales.shape == (6, 2)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), np.asarray(expected[0]).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(expected[1]))
    with pytest.raises(ValueError, match="hidden=256"):
        nvfp4.activations_to_fp8_groups(payload[:, 1:], g, 256)
