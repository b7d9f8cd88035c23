"""NVFP4 dispatch tokens to the W8A8 experts' FP8 groups in one kernel: the same codes and scales
as the XLA form. The Triton kernel runs under Pallas's interpreter here and is lowered for the
CUDA platform; `JAX_PLATFORMS=cuda MINIMAX_JAX_KERNEL_TESTS=gpu pytest tests/test_nvfp4_tokens.py`
compiles it on a GPU."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.ops import nvfp4_tokens
from quant import nvfp4

ON_GPU = os.environ.get("MINIMAX_JAX_KERNEL_TESTS") == "gpu"


def _tokens(n: int, hidden: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, hidden)) * rng.uniform(1e-3, 1e3, (n, 1))).astype(np.float32)
    x[1] = 0.0                              # a zero token: scales of 1, codes 0
    x[2, :128] = 0.0                        # a zero group beside live ones
    x[3, 5] = 1e4                           # one block far above the rest of its group
    return jax.jit(nvfp4.quantize_activations)(x)


@pytest.mark.parametrize("n", [37, 64])       # a last tile of 5 rows, and whole tiles
def test_kernel_gives_the_codes_and_scales_of_the_xla_form(n):
    payload, g = _tokens(n, 512)
    codes, scales = nvfp4_tokens.fp8_groups(payload, g, 512, interpret=not ON_GPU)
    expected = jax.jit(nvfp4.activations_to_fp8_groups, static_argnames=("hidden", "group"))(payload, g, 512)
    assert codes.dtype == jnp.float8_e4m3fn and codes.shape == (n, 512) and scales.shape == (n, 4)
    # amax / 448 rounds once in the XLA form (its divisions are exact); the interpreter divides by
    # the constant's reciprocal: the scales agree to their last bit, and the codes but where the
    # quotient sat on a midpoint, which NVFP4's coarse values over the group's largest often do
    # (0.3% of them here)
    np.testing.assert_allclose(np.asarray(scales), np.asarray(expected[1]), rtol=2.5e-7, atol=0)
    got, want = np.asarray(codes.astype(jnp.float32)), np.asarray(expected[0].astype(jnp.float32))
    assert np.mean(got != want) < 1e-2
    assert (np.abs(got - want) <= np.abs(want) / 8 + 2.0 ** -9).all()      # one E4M3 step at most


def test_kernels_lower_for_gpus_at_w1s_dep4_prefill_size():
    """A DEP4 rank of W1's prefill step: 8192 tokens of 3072 quantised, 4 x 8192 gathered."""
    args = (jax.ShapeDtypeStruct((32768, nvfp4.activation_payload_width(3072)), jnp.uint8),
            jax.ShapeDtypeStruct((32768, 1), jnp.float32))
    for fn, fn_args in ((lambda p, g: nvfp4_tokens.fp8_groups(p, g, 3072), args),
                        (nvfp4_tokens.quantize, (jax.ShapeDtypeStruct((8192, 3072), jnp.bfloat16),))):
        text = jax.jit(fn).trace(*fn_args).lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


def test_kernel_refuses_a_payload_of_another_width():
    payload, g = _tokens(8, 512)
    with pytest.raises(ValueError, match="hidden=512"):
        nvfp4_tokens.fp8_groups(payload[:, 1:], g, 512)


@pytest.mark.parametrize("n", [5, 40])
def test_quantize_kernel_gives_the_payload_of_the_xla_form(n):
    """Tokens whose blocks span the programs' edges (16 blocks a row, 256 a program), one with
    an inf and one with a NaN. The global scales are XLA's in both; a code or a scale may differ
    only where a quotient sat on a midpoint (the interpreter divides by reciprocals)."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 256)) * rng.uniform(1e-3, 1e3, (n, 1))).astype(np.float32)
    x[1, 3], x[2, 40] = np.inf, np.nan
    x = jnp.asarray(x, jnp.bfloat16)
    payload, g = nvfp4_tokens.quantize(x, interpret=not ON_GPU)
    want_payload, want_g = jax.jit(nvfp4.quantize_activations)(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want_g))
    got, want = np.asarray(payload), np.asarray(want_payload)
    assert got.shape == want.shape and np.mean(got != want) < 1e-2
    np.testing.assert_array_equal(got[2, 128 + 2], want[2, 128 + 2])      # the NaN block's scale: e4m3 NaN
    assert (got[2, 40 // 2 - 4:40 // 2 + 4] == 0).all()                   # and its codes 0
    dequantised = nvfp4.dequantize_activations(payload, g, 256)
    expected = nvfp4.dequantize_activations(want_payload, want_g, 256)
    finite = np.isfinite(np.asarray(expected))
    np.testing.assert_allclose(np.asarray(dequantised)[finite], np.asarray(expected)[finite],
                               rtol=0.25, atol=float(np.abs(np.asarray(expected)[finite]).max()) * 1e-2)
