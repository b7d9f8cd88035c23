"""The one-pass FP8 rounding kernel gives `quant.fp8.quantize_groups`' codes and scales. It runs
under Pallas's interpreter here; on a GPU `JAX_PLATFORMS=cuda MINIMAX_JAX_KERNEL_TESTS=gpu pytest
tests/test_fp8_rows.py` compiles it with Triton."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.ops import fp8_rows
from quant import fp8

ON_GPU = os.environ.get("MINIMAX_JAX_KERNEL_TESTS") == "gpu"


def rows(n: int, k: int, seed: int = 0) -> jax.Array:
    """Rows of magnitudes 1e-3 to 1e3, one group all zero."""
    rng = np.random.RandomState(seed)
    x = rng.standard_normal((n, k)) * np.exp(rng.uniform(-7, 7, (n, 1)))
    x[3, :128] = 0.0
    return jnp.asarray(x, jnp.bfloat16)


def test_kernel_rounds_rows_to_the_codes_and_scales_of_quant_fp8():
    """70 rows (the last program's partly past the end), an inf and a NaN among them."""
    x = rows(70, 384).at[5, 7].set(jnp.inf).at[6, 9].set(jnp.nan)
    codes, scales = fp8_rows.quantize_groups(x, interpret=not ON_GPU)
    want_codes, want_scales = jax.jit(fp8.quantize_groups, static_argnums=1)(x, 128)
    assert codes.dtype == jnp.float8_e4m3fn and codes.shape == (70, 384) and scales.shape == (70, 3)
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_scales))
    nan = np.isnan(np.asarray(want_codes.astype(jnp.float32)))
    assert nan.sum() == 1 and np.isnan(np.asarray(codes.astype(jnp.float32))[nan]).all()   # its sign bit may differ
    np.testing.assert_array_equal(np.asarray(codes.view(jnp.uint8))[~nan], np.asarray(want_codes.view(jnp.uint8))[~nan])
    assert float(scales[3, 0]) == 1.0 and not np.asarray(codes[3, :128].astype(jnp.float32)).any()


def test_kernel_refuses_rows_it_does_not_take():
    for x in (jnp.ones((4, 200), jnp.bfloat16), jnp.ones((4, 256), jnp.float32), jnp.ones((256,), jnp.bfloat16)):
        with pytest.raises(ValueError, match="16-bit rows"):
            fp8_rows.quantize_groups(x)
    assert fp8_rows.supports(jnp.ones((4, 256), jnp.float16))


def test_kernel_lowers_for_gpus_at_a_prefill_steps_size():
    x = jax.ShapeDtypeStruct((8192, 3072), jnp.bfloat16)
    text = jax.jit(fp8_rows.quantize_groups).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
