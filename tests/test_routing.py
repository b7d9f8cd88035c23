"""The few-token router kernels choose what the XLA router chooses. They run under Pallas's
interpreter here; on a GPU `JAX_PLATFORMS=cuda MINIMAX_JAX_KERNEL_TESTS=gpu pytest
tests/test_routing.py` compiles them with Triton."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model import Router, bf16_parts, fp32_product
from minimax_jax.ops import routing

ON_GPU = os.environ.get("MINIMAX_JAX_KERNEL_TESTS") == "gpu"


def stacked_router(layers: int, hidden: int, experts: int, top_k: int, seed: int = 0) -> Router:
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                      head_dim=64, rotary_dim=32, rope_theta=1e6, intermediate_size=128, num_experts=experts,
                      num_experts_per_tok=top_k, routed_scaling_factor=1.5)
    router = Router(cfg, nnx.Rngs(seed))
    rng = np.random.RandomState(seed)
    router.weight = nnx.Param(jnp.asarray(rng.standard_normal((layers, hidden, experts)) * 0.05, jnp.float32))
    router.bias = nnx.Param(jnp.asarray(rng.standard_normal((layers, experts)) * 0.1, jnp.float32))
    return router


def route(router: Router, kernel: str, h, valid, layer):
    router.kernel = kernel
    return router(h, valid, jnp.int32(layer))


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_router_kernels_choose_the_xla_routers_experts_and_weights(tokens):
    """Layer 1 of 2 stacked layers (K split over 4 programs: H of 12 blocks); token 1, where
    there is one, is padding."""
    router = stacked_router(layers=2, hidden=1536, experts=64, top_k=8)
    h = jnp.asarray(np.random.RandomState(tokens).standard_normal((tokens, 1536)), jnp.bfloat16)
    valid = jnp.arange(tokens) != 1
    want_ids, want_w = route(router, "xla", h, valid, 1)
    got_ids, got_w = route(router, "triton", h, valid, 1)
    np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-5, atol=1e-6)
    if tokens > 1:
        assert got_ids[1].tolist() == [64] * 8 and float(got_w[1].sum()) == 0.0
    other_ids, _ = route(router, "triton", h, valid, 0)
    assert not np.array_equal(np.asarray(other_ids), np.asarray(want_ids))


def test_many_token_choice_picks_the_xla_routers_experts_and_weights():
    """69 tokens of layer 1 (blocks of the kernel's rows, the last one padded): the logits are
    XLA's GEMM, the top-k and the weights the kernel's; tokens 1 and 68 are padding."""
    router = stacked_router(layers=2, hidden=256, experts=64, top_k=8, seed=4)
    h = jnp.asarray(np.random.RandomState(9).standard_normal((69, 256)), jnp.bfloat16)
    valid = (jnp.arange(69) != 1) & (jnp.arange(69) != 68)
    want_ids, want_w = route(router, "xla", h, valid, 1)
    got_ids, got_w = route(router, "triton", h, valid, 1)
    np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-5, atol=1e-6)
    assert got_ids[68].tolist() == [64] * 8 and float(got_w[68].sum()) == 0.0
    assert float(got_w[0].sum()) == pytest.approx(1.5, rel=1e-6)
    assert routing.supports_many(17, 64, 8) and not routing.supports_many(16, 64, 8)


def test_router_kernels_break_ties_toward_the_lower_expert_as_top_k_does():
    router = stacked_router(layers=1, hidden=128, experts=16, top_k=2)
    weight = router.weight[...].at[0, :, 9].set(router.weight[0, :, 3])
    router.weight = nnx.Param(weight)
    router.bias = nnx.Param(jnp.zeros((1, 16), jnp.float32).at[0, 3].set(5.0).at[0, 9].set(5.0))
    for tokens in (1, 32):      # route_few, then choose_many
        h = jnp.ones((tokens, 128), jnp.float32)
        ids, _ = route(router, "triton", h, jnp.ones((tokens,), bool), 0)
        want, _ = route(router, "xla", h, jnp.ones((tokens,), bool), 0)
        assert ids.tolist() == want.tolist() == [[3, 9]] * tokens


def test_router_scores_many_tokens_in_full_fp32_as_transformers_does():
    """64 tokens take XLA's router: its dot must ask for fp32 products whatever the default
    precision (XLA's on GPUs rounds fp32 operands to TF32, about 1e-3 off), checked in the
    lowered program and against float64 numbers."""
    router = stacked_router(layers=1, hidden=1536, experts=64, top_k=8, seed=3)
    h = jnp.asarray(np.random.RandomState(5).standard_normal((64, 1536)), jnp.bfloat16)
    valid = jnp.ones((64,), bool)
    router.kernel = "xla"
    f = jax.jit(lambda h: router(h, valid, jnp.int32(0)))
    with jax.default_matmul_precision("tensorfloat32"):       # as on GPUs (this suite asks for "highest")
        dots = [line for line in f.trace(h).lower().as_text().splitlines() if "dot_general" in line]
        ids, weights = f(h)
    assert dots and all(not_rounded_to_tf32(dot) for dot in dots), dots
    w64 = np.asarray(router.weight[0], np.float64)
    scores = 1 / (1 + np.exp(-(np.asarray(h, np.float64) @ w64)))
    want_ids = np.argsort(-(scores + np.asarray(router.bias[0], np.float64)), axis=1, kind="stable")[:, :8]
    want = np.take_along_axis(scores, want_ids, axis=1)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want / want.sum(axis=1, keepdims=True) * 1.5, rtol=2e-6)


def not_rounded_to_tf32(dot: str) -> bool:
    """A lowered dot_general whose operands are 16-bit, or that asks for fp32 products."""
    operands = dot.rsplit(" : (", 1)[1].split(") ->")[0]
    return "f32>" not in operands or "precision = [HIGHEST, HIGHEST]" in dot


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp32_product_matches_float64_to_fp32_sums(dtype):
    """bf16 rows against fp32 weights through three exact bf16 parts of the weights (one bf16
    GEMM), fp32 rows through fp32 products: both within fp32 summation of float64's numbers,
    where TF32's operand rounding is 5e-5 of the absolute sums off on these numbers."""
    rng = np.random.RandomState(11)
    x = jnp.asarray(rng.standard_normal((48, 3072)), dtype)
    w = rng.standard_normal((3072, 256)) * np.exp(rng.uniform(-6, 2, (3072, 256)))   # many exponents
    w = jnp.asarray(w, jnp.float32)
    with jax.default_matmul_precision("tensorfloat32"):
        got = np.asarray(jax.jit(fp32_product)(x, w), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = np.abs(x64) @ np.abs(w64) * 3072 * 2.0 ** -24          # fp32 summation, each term exact
    assert np.all(np.abs(got - x64 @ w64) <= bound)
    assert np.max(np.abs(got - x64 @ w64) / (np.abs(x64) @ np.abs(w64))) < 1e-6


def test_router_takes_xla_for_shapes_the_kernels_do_not_take():
    assert routing.supports(16, 3072, 256, 8)
    assert not routing.supports(17, 3072, 256, 8)       # more tokens than a kernel's rows
    assert not routing.supports(1, 3072, 48, 8)         # Triton blocks are powers of two
    assert not routing.supports(1, 3072, 8, 2)          # tiny test models keep XLA's router
    router = stacked_router(layers=1, hidden=128, experts=8, top_k=2)
    h = jnp.ones((2, 128), jnp.float32)
    ids, _ = route(router, "triton", h, jnp.ones((2,), bool), 0)     # falls back, no error
    assert ids.shape == (2, 2)
    router.kernel = "cuda"
    with pytest.raises(ValueError, match="router kernel must be one of"):
        router(h, jnp.ones((2,), bool), jnp.int32(0))


def test_router_kernels_lower_for_gpus_at_full_size():
    """MiniMax-M2's router (3072 x 256, top 8) over 62 stacked layers lowers to Triton here."""
    args = (jax.ShapeDtypeStruct((1, 3072), jnp.bfloat16), jax.ShapeDtypeStruct((62, 3072, 256), jnp.float32),
            jax.ShapeDtypeStruct((62, 256), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.bool_))
    f = jax.jit(lambda h, w, b, layer, valid: routing.route_few(h, w, b, layer, valid, 8, 1.0))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
    logits = jax.ShapeDtypeStruct((8192, 256), jnp.float32)
    f = jax.jit(lambda x, b, layer, valid: routing.choose_many(x, b, layer, valid, 8, 1.0))
    text = f.trace(logits, args[2], args[3], jax.ShapeDtypeStruct((8192,), jnp.bool_)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


def test_bf16_parts_sum_to_the_fp32_weights_exactly():
    rng = np.random.RandomState(2)
    w = jnp.asarray(rng.standard_normal((64, 32)) * np.exp(rng.uniform(-40, 40, (64, 32))), jnp.float32)
    parts = jax.jit(bf16_parts)(w)
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    np.testing.assert_array_equal(sum(np.asarray(p, np.float64) for p in parts), np.asarray(w, np.float64))
    assert np.any(np.asarray(parts[2]) != 0)        # the third part is needed
