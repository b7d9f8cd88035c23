"""Experts held as FP8 blocks or NVFP4 on device, used weight-only; ModelOpt NVFP4 checkpoints."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax.config import preset
from minimax_jax.engine.engine import Engine
from minimax_jax.hf_testing import make_hf_model, quantize_checkpoint_nvfp4, save_hf_checkpoint
from minimax_jax.loader import load_model
from minimax_jax.model import Experts, MiniMaxM2
from sharding.mesh import Layout, LayoutError
from tests.test_model_vs_transformers import prefill_logits

NVFP4_RELATIVE_ERROR = 0.1    # per weight matrix, Frobenius, asserted in test_quant_nvfp4
FP8_RELATIVE_ERROR = 0.03     # per weight matrix, Frobenius, asserted in test_quant_fp8
EXPERT_MATMULS = 3            # w1, w3, w2 on each layer's path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    hf = make_hf_model(seed=21, hidden_size=128, intermediate_size=64)
    src = save_hf_checkpoint(hf, tmp_path_factory.mktemp("src"))
    return src, quantize_checkpoint_nvfp4(src, tmp_path_factory.mktemp("nvfp4"))


def expert_arrays(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model.layers.experts))}


@pytest.mark.parametrize("quantization, per_matmul", [("fp8", FP8_RELATIVE_ERROR), ("modelopt_fp4", NVFP4_RELATIVE_ERROR)])
def test_quantized_experts_logits_stay_within_the_format_bound(checkpoints, quantization, per_matmul):
    src, _ = checkpoints
    ids = np.random.RandomState(1).randint(0, 512, (2, 10))
    exact = prefill_logits(load_model(src, dtype=jnp.float32), ids)
    quantized = prefill_logits(load_model(src, dtype=jnp.float32, quantization=quantization), ids)
    # first order: each quantised expert matmul on the path adds its format's relative error
    bound = per_matmul * EXPERT_MATMULS * 2
    error = np.linalg.norm(quantized - exact) / np.linalg.norm(exact)
    assert 0 < error <= bound, (quantization, error)


def test_modelopt_checkpoint_loads_bit_identical_to_quantising_its_source(checkpoints):
    src, modelopt = checkpoints
    from_source = expert_arrays(load_model(src, dtype=jnp.float32, quantization="modelopt_fp4"))
    from_modelopt = expert_arrays(load_model(modelopt, dtype=jnp.float32, quantization="modelopt_fp4"))
    assert from_source.keys() == from_modelopt.keys()
    for key in from_source:
        assert from_source[key].dtype == from_modelopt[key].dtype, key
        np.testing.assert_array_equal(from_source[key].view(np.uint8), from_modelopt[key].view(np.uint8), err_msg=str(key))
    assert from_modelopt[("w13",)].dtype == np.uint8 and from_modelopt[("w13_scale",)].dtype == jnp.float8_e4m3fn


def test_modelopt_checkpoint_is_detected_and_experts_without_input_scale_stay_finite(checkpoints):
    _, modelopt = checkpoints
    engine = Engine(model_path=str(modelopt), dtype="float32", context_length=32, page_size=4)
    assert engine.model.expert_format == "nvfp4" and engine.layout.fp4_dispatch
    out = engine.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 4, "temperature": 0},
                          return_logprob=True)
    assert all(np.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])


def test_quantized_experts_run_on_expert_and_tensor_parallel_layouts(checkpoints):
    src, _ = checkpoints
    prompt = [5, 6, 7, 8, 9]
    params = {"max_new_tokens": 8, "temperature": 0}
    for quantization in ("fp8", "modelopt_fp4"):
        alone = Engine(model_path=str(src), dtype="float32", quantization=quantization, context_length=32,
                       page_size=4, moe_dispatch_fp4=False).generate(input_ids=prompt, sampling_params=params)
        layouts = [dict(tp_size=8, dp_size=2, enable_dp_attention=True)]
        if quantization == "modelopt_fp4":       # FP8 blocks are 128 wide: intermediate 64 can't split
            layouts.append(dict(tp_size=4, ep_size=1))
        for flags in layouts:
            engine = Engine(model_path=str(src), dtype="float32", quantization=quantization, context_length=32,
                            page_size=4, moe_dispatch_fp4=False, **flags)
            assert engine.generate(input_ids=prompt, sampling_params=params)["output_ids"] == alone["output_ids"]


def test_moe_tp_that_cuts_scale_blocks_is_refused():
    cfg = preset("minimax-m2.5")
    with pytest.raises(LayoutError, match="cut their 128-wide scale blocks"):
        Layout(1, 8, moe="tp").check(cfg, "fp8")
    Layout(1, 4, moe="tp").check(cfg, "fp8")        # 1536 / 4 = 384: whole blocks
    Layout(1, 8, moe="tp").check(cfg, "nvfp4")      # 192 = 12 blocks of 16


@pytest.mark.parametrize("expert_format, limit", [("nvfp4", 0.57), ("fp8", 1.01)])
def test_full_size_expert_bytes_per_parameter(expert_format, limit):
    cfg = preset("minimax-m2.5")
    model = nnx.eval_shape(lambda: MiniMaxM2(cfg, expert_format=expert_format, rngs=nnx.Rngs(0)))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers.experts)))
    params = cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    assert nbytes / params <= limit


@pytest.mark.parametrize("expert_format", ["bf16", "fp8", "nvfp4"])
def test_few_tokens_read_their_own_experts_up_to_a_quarter_as_many_pairs_as_local_experts(expert_format):
    # measured on one H200 (docs/benchmarks.md runs FD-FF): pairs won at 8 tokens on 256 experts
    # and lost to the grouped kernels at 16
    cfg = dataclasses.replace(preset("tiny"), hidden_size=128, intermediate_size=128, num_experts=256)
    experts = nnx.eval_shape(lambda: Experts(cfg, jnp.bfloat16, nnx.Rngs(0), expert_format))
    top_k = 8
    assert experts._path(8 * top_k)[1] and not experts._path(16 * top_k)[1]
    assert experts._path(1 * top_k)[1]
