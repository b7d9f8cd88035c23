"""A checkpoint in the released FP8 format (128x128 E4M3 blocks) loads exactly."""
import numpy as np
import pytest
import torch
import jax.numpy as jnp
import shutil

from safetensors.torch import load_file, save_file
from transformers import MiniMaxM2ForCausalLM

from minimax_jax.hf_testing import fp8_checkpoint_pair, make_hf_model
from minimax_jax.loader import load_model
from tests.test_model_vs_transformers import prefill_logits

# widths above 128 and not multiples of it, so blocks and edge blocks are both exercised
FP8_SHAPES = dict(hidden_size=192, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=48, rotary_dim=16, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    hf = make_hf_model(seed=11, **FP8_SHAPES)
    return hf, *fp8_checkpoint_pair(hf, tmp_path_factory.mktemp("bf16"), tmp_path_factory.mktemp("fp8"))


def torch_dequantized(fp8_dir) -> dict:
    """The FP8 checkpoint dequantised by torch, independently of our code."""
    tensors = load_file(fp8_dir / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[name.removesuffix(".weight") + ".weight_scale_inv"]
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: t.shape[0], : t.shape[1]]
            out[name] = t.float() * full
        else:
            out[name] = t.float()
    return out


def test_fp8_checkpoint_holds_e4m3_blocks(fp8_pair):
    _, _, fp8 = fp8_pair
    tensors = load_file(fp8 / "model.safetensors")
    w = tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert w.dtype == torch.float8_e4m3fn and w.shape == (160, 192)
    assert tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv"].shape == (2, 2)
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16


def test_fp8_checkpoint_logits_equal_transformers_on_dequantized_weights(fp8_pair, tmp_path):
    _, src, fp8 = fp8_pair
    save_file(torch_dequantized(fp8), tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "config.json")
    hf = MiniMaxM2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.RandomState(4).randint(0, 512, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = prefill_logits(load_model(fp8, dtype=jnp.float32), ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp8_checkpoint_stays_within_e4m3_error_of_its_bf16_source(fp8_pair):
    _, src, fp8 = fp8_pair
    ids = np.random.RandomState(5).randint(0, 512, (2, 9))
    exact = prefill_logits(load_model(src, dtype=jnp.float32), ids)
    quantized = prefill_logits(load_model(fp8, dtype=jnp.float32), ids)
    # E4M3 blocks cost each weight matrix at most 0.03 relative (Frobenius, asserted in
    # test_quant_fp8); to first order the logits add one such error per quantised matmul on the
    # path (q, k, v, o, w1, w3, w2 per layer). Measured here: 0.16 relative, bound 0.42.
    quantised_matmuls = 7 * 2
    assert np.linalg.norm(quantized - exact) <= 0.03 * quantised_matmuls * np.linalg.norm(exact)
