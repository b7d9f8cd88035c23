"""Attention beside FP8 experts runs W8A8 on the checkpoint's own blocks, its q, k and v rows
grouped by KV head, and every layout splits those groups as the single device computes them."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
import torch
from safetensors.torch import load_file

from minimax_jax.config import ModelConfig
from minimax_jax.hf_testing import fp8_checkpoint_pair, make_hf_model
from minimax_jax.loader import load_model
from minimax_jax.model import attention_format
from minimax_jax.ops import fp8_linear
from quant import fp8
from sharding.mesh import Layout
from tests.parallel_utils import LayoutRunner, make_step, needs_devices, reference_logits
from tests.test_model_vs_transformers import prefill_logits

# the smallest shapes whose heads are whole 128-wide blocks: 4 query heads per KV head
SHAPES = dict(hidden_size=256, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
              head_dim=128, rotary_dim=64, num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return fp8_checkpoint_pair(make_hf_model(seed=21, **SHAPES), tmp_path_factory.mktemp("bf16"),
                               tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="module")
def fp8_model(checkpoints):
    return load_model(checkpoints[1], dtype=jnp.float32, quantization="fp8")


def test_attention_is_fp8_only_beside_fp8_experts_with_heads_of_whole_blocks():
    aligned = _config(head_dim=128, hidden_size=256)
    assert attention_format(aligned, "fp8") == "fp8"
    assert attention_format(aligned, "bf16") == "bf16"
    assert attention_format(aligned, "nvfp4") == "bf16"
    assert attention_format(_config(head_dim=48, hidden_size=192), "fp8") == "bf16"
    assert attention_format(_config(head_dim=128, hidden_size=192), "fp8") == "bf16"


def test_checkpoint_blocks_load_bit_for_bit_grouped_by_kv_head(checkpoints, fp8_model):
    # as raw bits: fp8 codes as bytes, scales as fp32
    tensors = {k: (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()
               for k, t in load_file(checkpoints[1] / "model.safetensors").items() if "_proj" in k}
    attn = fp8_model.layers.attn
    for layer in range(2):
        name = lambda w, suffix="weight": tensors[f"model.layers.{layer}.self_attn.{w}_proj.{suffix}"]  # noqa: E731
        for ours, rows_per_head, suffix in ((attn.wqkv_fp8, 128, "weight"), (attn.wqkv_fp8_scale, 1, "weight_scale_inv")):
            grouped = np.asarray(ours[...][layer]).reshape(2, 6, rows_per_head, -1)     # 2 KV heads: 4 q, k, v
            q = name("q", suffix).reshape(2, 4, rows_per_head, -1)
            bits = grouped.view(np.uint8) if grouped.dtype.itemsize == 1 else grouped
            np.testing.assert_array_equal(bits[:, :4], q)
            np.testing.assert_array_equal(bits[:, 4], name("k", suffix).reshape(2, rows_per_head, -1))
            np.testing.assert_array_equal(bits[:, 5], name("v", suffix).reshape(2, rows_per_head, -1))
        np.testing.assert_array_equal(np.asarray(attn.wo_fp8[...][layer]).view(np.uint8), name("o"))
        np.testing.assert_array_equal(np.asarray(attn.wo_fp8_scale[...][layer]), name("o", "weight_scale_inv"))


def test_w8a8_attention_stays_within_the_rounding_of_its_inputs(checkpoints, fp8_model):
    """Against the same FP8 blocks dequantised and multiplied by unrounded inputs, the logits
    move by the e4m3 rounding of each W8A8 matmul's inputs: 3 mantissa bits, 3.6% RMS relative
    per element, to first order one such error per rounded matmul on the path (qkv, o, gate/up,
    down per layer). Measured: 5.8% relative, bound 29%."""
    ids = np.random.RandomState(3).randint(0, 512, (2, 9))
    ours = prefill_logits(fp8_model, ids)
    unrounded = prefill_logits(load_model(checkpoints[1], dtype=jnp.float32), ids)
    error = np.linalg.norm(ours - unrounded) / np.linalg.norm(unrounded)
    assert 0 < error <= 0.036 * 4 * fp8_model.cfg.num_layers


@pytest.mark.parametrize("layout", [Layout(1, 2), Layout(1, 4)], ids=str)
def test_tensor_parallel_splits_the_kv_head_groups_as_one_device_computes_them(fp8_model, layout):
    """tp 4 over 2 KV heads splits each group's query heads in two and copies its key and value
    (DEP with tp runs through the engine, below)."""
    rng = np.random.RandomState(0)
    tokens, valid = rng.randint(0, 512, (8, 8)), np.ones((8, 8), bool)
    ref = reference_logits(fp8_model, tokens, valid, page_size=4)
    runner = LayoutRunner(fp8_model, layout, 8 // layout.dp * 2, 4)
    table = (np.arange(8) % (8 // layout.dp))[:, None] * 2 + np.arange(2)
    logits, _ = runner(make_step(tokens, valid, table), np.full(8, 7))
    # the mesh computes in another order, and rounding to e4m3 can turn such an fp32 difference
    # into a one-code flip: measured on tp 4, one slot off by 2e-4 of the largest logit and the
    # rest by 6e-7 (a query head read against the wrong key would be O(1) everywhere)
    error = np.abs(logits - ref).max(axis=1) / np.abs(ref).max()
    assert np.sum(error > 1e-5) <= 1 and error.max() <= 1e-3


@pytest.mark.parametrize("kernel,rows", [("mosaic-ws-w8a8", 130), ("triton-w8a16", 1), ("triton-w8a16", 3),
                                         ("triton-w8a16", 16)])
def test_each_kernel_reads_a_layer_of_stacked_weights_as_the_reference_computes_it(kernel, rows):
    """Under Pallas's interpreters here; 130 rows: a partial second block of 128 for the Mosaic
    kernel, which takes any number; the Triton kernel takes up to 16, unrounded (weight-only)."""
    rng = np.random.RandomState(1)
    w, scale = fp8.quantize_blockwise(rng.standard_normal((3, 256, 384)).astype(np.float32) * 0.02)
    x = jnp.asarray(rng.standard_normal((rows, 384)), jnp.bfloat16)
    ref = fp8_linear.reference(x, w[2], scale[2], round_rows=kernel != "triton-w8a16")
    on_gpu = jax.default_backend() == "gpu"
    interpret = None if on_gpu else (InterpretGPUParams() if kernel.startswith("mosaic") else True)
    out = fp8_linear.fp8_linear(x, w, scale, jnp.int32(2), kernel=kernel, interpret=interpret)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=1e-2 * float(jnp.abs(ref.astype(jnp.float32)).max()))
    other = fp8_linear.fp8_linear(x, w, scale, jnp.int32(1), kernel=kernel, interpret=interpret)
    assert not np.allclose(np.asarray(other, np.float32), np.asarray(ref, np.float32), atol=1e-2)


def test_auto_takes_the_triton_kernel_for_a_few_rows_on_hopper_and_the_reference_elsewhere(monkeypatch):
    from minimax_jax.ops import moe
    monkeypatch.setattr(moe, "on_hopper", lambda: True)
    assert fp8_linear.resolve_kernel("auto", rows=1) == fp8_linear.resolve_kernel("auto", rows=16) == "triton-w8a16"
    assert fp8_linear.resolve_kernel("auto", rows=17) == "mosaic-ws-w8a8"
    monkeypatch.setattr(moe, "on_hopper", lambda: False)
    assert fp8_linear.resolve_kernel("auto", rows=1) == "xla-w8a8"


def test_fp8_linear_refuses_shapes_off_the_128_blocks():
    w = jnp.zeros((1, 200, 256), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_linear.fp8_linear(jnp.zeros((2, 256)), w, jnp.ones((1, 2, 2)), 0)
    with pytest.raises(ValueError, match="must be one of"):
        fp8_linear.resolve_kernel("cublas")
    with pytest.raises(ValueError, match="at most 16 rows"):
        fp8_linear.few_rows(jnp.zeros((17, 256)), jnp.zeros((1, 256, 256), jnp.float8_e4m3fn), jnp.ones((1, 2, 2)), 0)


def _config(head_dim: int, hidden_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=hidden_size, num_layers=2, num_heads=8, num_kv_heads=2,
                       head_dim=head_dim, rotary_dim=16, rope_theta=1e6, intermediate_size=128, num_experts=8,
                       num_experts_per_tok=2)


@pytest.mark.parametrize("rows", [1, 2])
def test_few_rows_split_over_k_adds_its_partial_sums_to_the_weight_only_reference(rows):
    """K of 12 blocks: `triton_common.k_splits` gives 4 programs over K per block of channels;
    one row is repeated inside the kernel, two are padded before it."""
    rng = np.random.RandomState(2)
    w, scale = fp8.quantize_blockwise(rng.standard_normal((2, 128, 1536)).astype(np.float32) * 0.02)
    x = jnp.asarray(rng.standard_normal((rows, 1536)), jnp.bfloat16)
    ref = np.asarray(fp8_linear.reference(x.astype(jnp.float32), w[1], scale[1], round_rows=False))
    interpret = jax.default_backend() != "gpu"
    for splits in (None, 2):
        out = fp8_linear.few_rows(x, w, scale, jnp.int32(1), splits=splits, interpret=interpret)
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-3 * np.abs(ref).max())
    parts = fp8_linear.few_rows(x, w, scale, jnp.int32(1), partial_sums=True, interpret=interpret)
    assert parts.shape == (4, 1 if rows == 1 else 16, 128) and parts.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(parts.sum(0)[:rows]), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_engine_greedy_tokens_on_tp4_over_two_kv_heads_and_dep_equal_one_device(checkpoints):
    """Through the engine (its runner's placement, the scheduler, sampling): tp 4 splits each
    KV head's group in two, DEP 2 x TP 2 runs whole groups; greedy tokens equal one device's."""
    from minimax_jax.engine.engine import Engine
    needs_devices(4)
    rng = np.random.RandomState(5)
    prompts = [rng.randint(0, 512, n).tolist() for n in (4, 13, 9)]

    def greedy(**flags):
        engine = Engine(model_path=str(checkpoints[1]), quantization="fp8", dtype="float32", context_length=32,
                        page_size=4, **flags)
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 8, "temperature": 0.0})
        return [o["output_ids"] for o in outs]

    expected = greedy()
    assert greedy(tp_size=4) == expected
    assert greedy(tp_size=4, dp_size=2, enable_dp_attention=True) == expected
    # random weights of these shapes drawn on the devices, KV head groups split there
    dummy = greedy(tp_size=4, load_format="dummy")
    assert [len(tokens) for tokens in dummy] == [8] * 3 and dummy != expected


def test_few_rows_takes_eight_splits_where_four_leave_few_programs():
    """One row on an H200 (docs/benchmarks.md): TP1's o (48 K blocks, 96 blocks of channels) and
    TP4's qkv take 8; TP1's qkv (256 blocks of channels) keeps 4, TP4's o (12 K blocks) too."""
    assert fp8_linear.few_rows_splits(48, 96) == 8 and fp8_linear.few_rows_splits(24, 64) == 8
    assert fp8_linear.few_rows_splits(24, 256) == 4 and fp8_linear.few_rows_splits(12, 96) == 4
    assert fp8_linear.few_rows_splits(6, 96) == 1


@pytest.mark.parametrize("quantization", ["fp8", None])
def test_engine_greedy_tokens_through_the_few_rows_kernels_on_tp4_equal_one_device(checkpoints, quantization,
                                                                                  monkeypatch):
    """A few decode rows take the Triton kernels (weight-only projections, `ops.attention_inputs`,
    the decode attention), interpreted here: on TP4 each KV head is copied to two devices and the
    sums of squares are reduced per KV head; greedy tokens equal one device's. FP8 attention
    (the FP8 checkpoint) and bf16 attention (the bf16 one) alike."""
    from minimax_jax.engine.engine import Engine
    from minimax_jax.ops import attention_inputs
    needs_devices(4)
    resolve, takes, finish = fp8_linear.resolve_kernel, fp8_linear.takes_few_rows, attention_inputs.finish
    monkeypatch.setattr(fp8_linear, "resolve_kernel", lambda kernel, rows=17, w=None: (
        "triton-w8a16" if kernel == "auto" and rows <= fp8_linear.FEW_ROWS else resolve(kernel, rows, w)))
    monkeypatch.setattr(fp8_linear, "takes_few_rows", lambda kernel, rows, w: takes(
        "triton-w8a16" if kernel == "auto" else kernel, rows, w))
    traced = []
    monkeypatch.setattr(attention_inputs, "finish", lambda *a, **k: traced.append(1) or finish(*a, **k))
    rng = np.random.RandomState(6)
    prompts = [rng.randint(0, 512, n).tolist() for n in (4, 9)]

    def greedy(**flags):
        source = checkpoints[1] if quantization else checkpoints[0]
        engine = Engine(model_path=str(source), quantization=quantization, dtype="float32", context_length=32,
                        page_size=4, decode_attention_backend="pallas", **flags)
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 6, "temperature": 0.0})
        return [o["output_ids"] for o in outs]

    expected = greedy()
    one_device = len(traced)
    assert one_device and greedy(tp_size=4) == expected
    assert len(traced) > one_device            # the TP4 step took the kernels too
