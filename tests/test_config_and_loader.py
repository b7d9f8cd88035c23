"""Config forms, parameter count at full size, and one-line errors for bad checkpoints."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from minimax_jax.config import ConfigError, ModelConfig, preset
from minimax_jax.loader import CheckpointLayout, load_model
from minimax_jax.model import MiniMaxM2
from minimax_jax.safetensors_index import CheckpointError

LEGACY = {  # the form of the original release's config.json
    "model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "num_hidden_layers": 62,
    "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64,
    "rope_theta": 5000000, "intermediate_size": 1536, "num_local_experts": 256,
    "num_experts_per_tok": 8, "qk_norm_type": "per_layer", "use_qk_norm": True,
    "use_routing_bias": True, "scoring_func": "sigmoid", "routed_scaling_factor": 1.0,
    "rms_norm_eps": 1e-06, "max_position_embeddings": 196608, "num_mtp_modules": 3,
    "eos_token_id": 200020, "bos_token_id": 200034, "tie_word_embeddings": False,
}


def test_legacy_and_transformers5_forms_give_the_full_preset():
    v5 = {k: v for k, v in LEGACY.items() if k not in ("rotary_dim", "rope_theta")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    assert ModelConfig.from_hf(LEGACY) == preset("minimax-m2.5")
    assert ModelConfig.from_hf(v5) == preset("minimax-m2.5")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"qk_norm_type": "per_head"}, "qk_norm_type 'per_head'"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    ({"num_key_value_heads": 7}, "not divisible"),
    ({"num_local_experts": None}, "num_local_experts"),
])
def test_unsupported_config_fails_with_one_line(change, message):
    hf = {**LEGACY, **change}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig.from_hf(hf)
    assert "\n" not in str(err.value)


def test_full_preset_parameter_count_equals_transformers():
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM
    cfg = preset("minimax-m2.5")
    abstract = nnx.eval_shape(lambda: MiniMaxM2(cfg, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
    with torch.device("meta"):
        hf = MiniMaxM2ForCausalLM(MiniMaxM2Config(**cfg.to_hf()))
    theirs = sum(t.numel() for t in hf.state_dict().values())   # parameters + routing-bias buffers
    assert ours == theirs
    assert 228e9 < ours < 231e9


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def never_loads(monkeypatch):
    """Fails the test if any parameter starts loading: errors must come before that."""
    def boom(*a, **k):
        raise AssertionError("a parameter was loaded before the checkpoint was validated")
    monkeypatch.setattr(CheckpointLayout, "load_top", boom)
    monkeypatch.setattr(CheckpointLayout, "layer_values", boom)


def test_missing_tensors_are_listed(tiny_hf_dir, tmp_path, never_loads):
    path = _copy(tiny_hf_dir, tmp_path)
    _rewrite(path, lambda t: [t.pop("model.layers.1.self_attn.k_proj.weight"), t.pop("model.norm.weight")])
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\): .*model.layers.1.self_attn.k_proj.weight"):
        load_model(path)


def test_wrong_shape_names_tensor_expected_and_found(tiny_hf_dir, tmp_path, never_loads):
    path = _copy(tiny_hf_dir, tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 100)))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.o_proj.weight has shape \[64, 100\], expected \[64, 128\]"):
        load_model(path)


def test_truncated_file_is_refused(tiny_hf_dir, tmp_path, never_loads):
    path = _copy(tiny_hf_dir, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_other_model_type_is_refused(tiny_hf_dir, tmp_path, never_loads):
    path = _copy(tiny_hf_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    with pytest.raises(ConfigError, match="model_type is 'mixtral'"):
        load_model(path)


def test_nonexistent_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint path"):
        load_model(tmp_path / "nope")


def test_mtp_layers_in_checkpoint_are_skipped(tiny_hf_dir, tmp_path):
    path = _copy(tiny_hf_dir, tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.2.self_attn.q_proj.weight", torch.ones(128, 64)))
    reference = load_model(tiny_hf_dir)
    model = load_model(path)
    for a, b in zip(jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_host_quantisation_runs_where_jax_has_no_cpu_backend(monkeypatch):
    """`JAX_PLATFORMS=cuda` leaves JAX without a CPU backend; loading then rounds on the default
    device instead of failing with "Unknown backend cpu"."""
    from minimax_jax import loader
    from quant import fp8
    real_devices = jax.devices

    def devices(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu. Available backends are ['cuda']")
        return real_devices(backend)

    monkeypatch.setattr(jax, "devices", devices)
    w = np.random.RandomState(0).standard_normal((256, 128)).astype(np.float32)
    q, scale = loader._on_host(fp8.quantize_blockwise, w, block=loader.FP8_BLOCK)
    assert isinstance(q, np.ndarray) and q.shape == (256, 128) and scale.shape == (2, 1)
