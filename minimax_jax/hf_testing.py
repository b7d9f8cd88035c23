"""Tiny random MiniMax-M2 checkpoints made with transformers (the oracle), for tests and demos.

Every weight is randomised, norm weights and the routing bias included, so that a bug cannot hide
behind ones and zeros. Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TINY_HF = dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, head_dim=16, rotary_dim=8,
               num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
               bos_token_id=None, eos_token_id=None)


def make_hf_model(seed: int = 0, **overrides: Any):
    """A MiniMaxM2ForCausalLM in float32 with every parameter and buffer randomised."""
    import torch
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    cfg = MiniMaxM2Config(**{**TINY_HF, **overrides})
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif "e_score_correction_bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def save_hf_checkpoint(model: Any, path: str | Path, dtype: str = "float32") -> Path:
    """Writes (a copy of) the model with the released tensor names (per-expert w1/w2/w3)."""
    import copy

    import torch

    path = Path(path)
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def fp8_checkpoint_pair(model: Any, bf16_dir: str | Path, fp8_dir: str | Path) -> tuple[Path, Path]:
    """The model saved in bf16, and that checkpoint in the released FP8 format."""
    src = save_hf_checkpoint(model, bf16_dir, dtype="bfloat16")
    return src, quantize_checkpoint_fp8(src, fp8_dir)


def quantize_checkpoint_fp8(src: str | Path, dst: str | Path) -> Path:
    """Rewrites a checkpoint in the released FP8 format: every linear weight of attention and
    experts as float8_e4m3fn with a per-128x128-block fp32 `weight_scale_inv`; the router gate,
    norms, embeddings and lm_head stay unquantised (the release's modules_to_not_convert)."""
    import torch

    from quant import fp8

    tensors, config = _read_checkpoint(src)
    out = {}
    for name, t in tensors.items():
        if _is_fp8_target(name):
            w8, scale = fp8.quantize_blockwise(t.float().numpy(), block=(128, 128))
            out[name] = torch.from_numpy(np.array(w8).view(np.uint8)).view(torch.float8_e4m3fn)
            out[name.removesuffix(".weight") + ".weight_scale_inv"] = torch.from_numpy(np.array(scale, np.float32))
        else:
            out[name] = t
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    return _write_checkpoint(dst, out, config)


def _is_fp8_target(name: str) -> bool:
    return name.endswith(".weight") and (".self_attn." in name and "_proj." in name or ".experts." in name)


def quantize_checkpoint_nvfp4(src: str | Path, dst: str | Path, without_input_scale: int = 1) -> Path:
    """Rewrites a checkpoint as NVIDIA ModelOpt exports NVFP4 experts: per expert linear a uint8
    `weight` [N, K/2] (two E2M1 codes a byte), float8_e4m3fn `weight_scale` [N, K/16], fp32
    scalar `weight_scale_2` and `input_scale`; attention, router and embeddings stay as they
    were. The last `without_input_scale` experts of each layer get no input_scale, like experts
    that calibration never routed to."""
    import torch

    from minimax_jax.loader import quantize_experts_nvfp4

    tensors, config = _read_checkpoint(src)
    num_experts = config["num_local_experts"]
    out = {}
    for name, t in tensors.items():
        if ".experts." not in name:
            out[name] = t
            continue
        prefix = name.removesuffix(".weight")
        q = quantize_experts_nvfp4(t.float().numpy())
        out[prefix + ".weight"] = torch.from_numpy(np.array(q.codes))
        out[prefix + ".weight_scale"] = torch.from_numpy(np.array(q.scales).view(np.uint8)).view(torch.float8_e4m3fn)
        out[prefix + ".weight_scale_2"] = torch.tensor(float(np.asarray(q.global_scale).reshape(())))
        expert = int(name.split(".experts.")[1].split(".")[0])
        if expert < num_experts - without_input_scale:
            out[prefix + ".input_scale"] = torch.tensor(1.0 / 448.0)
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    dst = _write_checkpoint(dst, out, config)
    (dst / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None,
                         "exclude_modules": ["lm_head", "*self_attn*", "*gate"]}}, indent=2))
    return dst


def _read_checkpoint(src: str | Path) -> tuple[dict, dict]:
    """Every tensor (torch) of a checkpoint directory, and its config.json."""
    from safetensors.torch import load_file

    src = Path(src)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors, json.loads((src / "config.json").read_text())


def _write_checkpoint(dst: str | Path, tensors: dict, config: dict) -> Path:
    """One model.safetensors and config.json in dst (created)."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
