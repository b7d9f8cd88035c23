"""A few decode rows' attention in Triton kernels (`ops.attention_inputs`, `Attention._few_rows_decode`)
against the XLA path it replaces, under Pallas's interpreter here and through its Triton lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax import model
from minimax_jax.config import ModelConfig
from minimax_jax.ops import attention_inputs
from quant import fp8

LAYERS, PAGES, PAGE_SIZE = 2, 12, 16
INTERPRET = jax.default_backend() != "gpu"


def _config(kv_heads: int = 2) -> ModelConfig:
    """Six query heads per KV head as MiniMax-M2; head_dim 32 with 16 rotary dims (halves of 8)."""
    return ModelConfig(vocab_size=512, hidden_size=256, num_layers=LAYERS, num_heads=6 * kv_heads,
                       num_kv_heads=kv_heads, head_dim=32, rotary_dim=16, rope_theta=1e4, intermediate_size=128,
                       num_experts=8, num_experts_per_tok=2)


def _attention(cfg: ModelConfig, dtype, seed: int = 0, weight_format: str = "fp8") -> model.Attention:
    """An Attention whose projections are stacked over LAYERS (as the layer loop holds them),
    FP8 or bf16, with random norm weights."""
    rng = np.random.RandomState(seed)
    attn = model.Attention(cfg, dtype, nnx.Rngs(seed), weight_format=weight_format)
    rows = cfg.q_size + 2 * cfg.kv_size
    wqkv = rng.standard_normal((LAYERS, rows, cfg.hidden_size)).astype(np.float32) * 0.05
    wo = rng.standard_normal((LAYERS, cfg.hidden_size, cfg.q_size)).astype(np.float32) * 0.05
    if weight_format == "fp8":
        (wqkv, sqkv), (wo, so) = fp8.quantize_blockwise(wqkv), fp8.quantize_blockwise(wo)
        attn.wqkv_fp8, attn.wqkv_fp8_scale = nnx.Param(wqkv), nnx.Param(sqkv)
        attn.wo_fp8, attn.wo_fp8_scale = nnx.Param(wo), nnx.Param(so)
    else:
        attn.wqkv, attn.wo = nnx.Param(jnp.asarray(wqkv, dtype)), nnx.Param(jnp.asarray(wo, dtype))
    # the norms' weights held for every layer too, as the layer loop holds them (model.QK_NORMS)
    attn.q_norm = nnx.Param(jnp.asarray(1 + 0.3 * rng.standard_normal((LAYERS, cfg.q_size)), dtype))
    attn.k_norm = nnx.Param(jnp.asarray(1 + 0.3 * rng.standard_normal((LAYERS, cfg.kv_size)), dtype))
    attn.projection_kernel, attn.decode_backend = "triton-w8a16", "pallas"
    return attn


def _decode_step(cfg: ModelConfig, positions: list[int], valid: list[bool], dtype, cache_dtype, seed: int = 1):
    rng = np.random.RandomState(seed)
    b = len(positions)
    table = jnp.asarray(rng.permutation(PAGES)[:b * 3].reshape(b, 3), jnp.int32)
    step = model.StepInput(tokens=jnp.zeros((b, 1), jnp.int32), positions=jnp.asarray(positions, jnp.int32)[:, None],
                           valid=jnp.asarray(valid)[:, None], page_table=table)
    shape = (LAYERS, PAGES, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim)
    kv = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(cache_dtype) for _ in range(2))
    h = jnp.asarray(rng.standard_normal((b, cfg.hidden_size)), dtype)
    return h, kv, step


@pytest.mark.parametrize("dtype,cache_dtype,weight_format", [(jnp.bfloat16, jnp.float8_e4m3fn, "fp8"),
                                                              (jnp.float32, jnp.bfloat16, "fp8"),
                                                              (jnp.bfloat16, jnp.float8_e4m3fn, "bf16")])
def test_few_rows_decode_equals_the_xla_path_and_writes_only_valid_slots(dtype, cache_dtype, weight_format,
                                                                         monkeypatch):
    """Three slots, the last one padding (its slot must stay as it was), contexts ending inside
    and on a page's end; layer 1 of 2 stacked layers; FP8 projections or bf16 ones, both read in
    place by the few-rows kernel."""
    cfg = _config()
    attn = _attention(cfg, dtype, weight_format=weight_format)
    h, kv, step = _decode_step(cfg, [5, 31, 0], [True, True, False], dtype, cache_dtype)
    layer = jnp.int32(1)
    assert attn._decodes_few_rows(h, 1, kv[0])
    o, (k_new, v_new) = attn(h, kv, layer, step, model.LocalComm())
    monkeypatch.setattr(model.Attention, "_decodes_few_rows", lambda *_: False)
    o_ref, (k_ref, v_ref) = attn(h, kv, layer, step, model.LocalComm())
    scale = float(jnp.abs(o_ref[:2].astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(o[:2], np.float32), np.asarray(o_ref[:2], np.float32), atol=2e-2 * scale)
    for new, ref, old in ((k_new, k_ref, kv[0]), (v_new, v_ref, kv[1])):
        new, ref, old = (np.asarray(a, np.float32) for a in (new, ref, old))
        differs = np.abs(new - ref) > 0.07 * np.abs(ref) + 1e-2
        assert differs.mean() < 0.01, differs.mean()      # an FP8 code's last bit, a few times
        assert (new != old).sum() == (ref != old).sum() > 0  # the same slots written, no others
        np.testing.assert_array_equal(new[0], old[0])        # layer 0 untouched


@pytest.mark.parametrize("rows", [1, 5, 40, 128])
def test_few_rows_reads_bf16_weights_of_the_given_layer_in_place(rows):
    """1-16 rows as one request's decode takes them; 17-128 padded to 64 and 128 rows, wider
    blocks of channels (taken on GPUs by "auto" too); more take XLA's GEMM."""
    rng = np.random.RandomState(2)
    w = jnp.asarray(rng.standard_normal((3, 256, 384)) * 0.05, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, 384)), jnp.bfloat16)
    out = model.fp8_linear.few_rows(x, w, None, 2, interpret=INTERPRET)
    ref = jnp.dot(x.astype(jnp.float32), w[2].astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    assert out.shape == (rows, 256) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)
    assert model.fp8_linear.takes_few_rows("triton-w8a16", rows, w)
    assert not model.fp8_linear.takes_few_rows("triton-w8a16", 129, w)
    assert model.fp8_linear.takes_few_rows("auto", rows, w) == (jax.default_backend() == "gpu")
    assert not model.fp8_linear.takes_few_rows("auto", 129, w)


def test_more_than_16_bf16_rows_take_the_projection_kernel_but_not_the_fused_decode():
    """Decode rows past the attention-input kernels' 16 (`_decodes_few_rows`) still have their bf16
    projections read in place by the named Triton kernel, equal to the layer's product."""
    cfg = _config()
    attn = _attention(cfg, jnp.bfloat16, weight_format="bf16")
    _, kv, _ = _decode_step(cfg, [5], [True], jnp.bfloat16, jnp.bfloat16)
    h = jnp.asarray(np.random.RandomState(3).standard_normal((40, cfg.hidden_size)), jnp.bfloat16)
    assert attn._few_rows_kernel(40) and not attn._decodes_few_rows(h, 1, kv[0])
    out = attn._projection(h, "wqkv", jnp.int32(1))
    ref = jnp.dot(h.astype(jnp.float32), attn.wqkv[1].astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)


def test_attention_inputs_queries_are_padded_rows_of_each_kv_head():
    cfg = _config()
    attn = _attention(cfg, jnp.bfloat16)
    h, kv, step = _decode_step(cfg, [7], [True], jnp.bfloat16, jnp.bfloat16)
    parts = model.fp8_linear.few_rows(h, attn.wqkv_fp8[...], attn.wqkv_fp8_scale[...], 0, partial_sums=True,
                                      interpret=INTERPRET)
    sums = attention_inputs.sums_of_squares(parts, 1, 2, 6, 32, interpret=INTERPRET)
    q, _, _ = attention_inputs.finish(parts, sums, attn.q_norm[0], attn.k_norm[0], jnp.asarray([7]),
                                      jnp.asarray([3]), *kv, 0, group=6, rotary_dim=16, theta=1e4,
                                      q_size=cfg.q_size, kv_size=cfg.kv_size, eps=1e-6, interpret=INTERPRET)
    assert q.shape == (1, 2, 16, 32) and q.dtype == jnp.bfloat16
    q = np.asarray(q, np.float32)
    assert np.all(q[:, :, 6:] == 0) and np.all(np.abs(q[:, :, :6]).sum(-1) > 0)
    # the sums of squares are each KV head's: q over its 6 heads, k over its one
    qkv = np.asarray(parts.sum(0)[0].astype(jnp.bfloat16), np.float32).reshape(2, 8, 32)
    expected = np.stack([(qkv[:, :6] ** 2).sum((1, 2)), (qkv[:, 6] ** 2).sum(-1)], -1)
    np.testing.assert_allclose(np.asarray(sums[0]), expected, rtol=1e-5)


def test_supports_needs_power_of_two_pieces_and_unwrapped_offsets():
    cache = jax.ShapeDtypeStruct((62, 4096, 64, 8, 128), jnp.float8_e4m3fn)
    assert attention_inputs.supports(128, 64, 8, cache)              # MiniMax-M2: halves of 32, 64 dims past them
    assert not attention_inputs.supports(128, 96, 8, cache)          # 48 and 32
    assert not attention_inputs.supports(128, 64, 3, cache)
    assert not attention_inputs.supports(128, 64, 8, jax.ShapeDtypeStruct((12, 4096, 64, 8, 128), jnp.float8_e4m3fn))


@pytest.mark.parametrize("kv_heads,splits", [(8, 4), (2, 1)])
def test_attention_inputs_lower_to_triton_for_gpus_at_full_size(kv_heads, splits):
    """MiniMax-M2's TP1 and TP4 shapes, one request, a 62-layer FP8 cache; the GPU's compile is
    left to the device tests."""
    n = kv_heads * 8 * 128
    parts = jax.ShapeDtypeStruct((splits, 16, n), jnp.float32)
    sums = jax.jit(lambda p: attention_inputs.sums_of_squares(p, 1, kv_heads, 6, 128)).trace(parts)
    assert "xla.gpu.triton" in sums.lower(lowering_platforms=("cuda",)).as_text()
    cache = jax.ShapeDtypeStruct((62, 4096, 64, kv_heads, 128), jnp.float8_e4m3fn)

    def finish(parts, sums, qn, kn, pos, slots, k, v, layer):
        return attention_inputs.finish(parts, sums, qn, kn, pos, slots, k, v, layer, group=6, rotary_dim=64,
                                       theta=5e6, q_size=6144, kv_size=1024, eps=1e-6)
    args = (parts, jax.ShapeDtypeStruct((1, kv_heads, 2), jnp.float32),
            jax.ShapeDtypeStruct((kv_heads * 768,), jnp.bfloat16),
            jax.ShapeDtypeStruct((kv_heads * 128,), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32), cache, cache,
            jax.ShapeDtypeStruct((), jnp.int32))
    text = jax.jit(finish, donate_argnums=(6, 7)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
