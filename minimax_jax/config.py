"""ModelConfig: the architecture numbers of a MiniMax-M2 model, read from an HF config.json.

Both config forms are accepted: the legacy one written by the original release (`rotary_dim`,
`qk_norm_type`, `use_routing_bias`, `scoring_func`) and the transformers-5 one
(`rope_parameters.partial_rotary_factor`). Anything this implementation does not support fails
with one line that names the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json this implementation cannot run, with a one-line reason."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 196608
    routed_scaling_factor: float = 1.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts={self.num_experts}]")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a config from the dict of an HF config.json (either form)."""
        _check_supported(hf)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        if hf.get("rotary_dim") is not None:
            rotary_dim = int(hf["rotary_dim"])
        else:
            rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))))
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 5_000_000.0))
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            rope_theta=float(rope_theta),
            intermediate_size=hf["intermediate_size"],
            num_experts=hf["num_local_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 196608)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Reads `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"no such checkpoint path: {path}")
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"no config.json at {file}")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The transformers-5 form of this config, accepted by `MiniMaxM2Config(**...)`."""
        return {
            "architectures": ["MiniMaxM2ForCausalLM"],
            "model_type": "minimax_m2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.rotary_dim / self.head_dim},
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
        }


def _check_supported(hf: dict[str, Any]) -> None:
    model_type = hf.get("model_type")
    if model_type != "minimax_m2":
        raise ConfigError(f"model_type is {model_type!r}; this implementation runs 'minimax_m2' only")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "num_local_experts", "num_experts_per_tok") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required fields: {', '.join(missing)}")
    if hf.get("use_qk_norm", True) is False:
        raise ConfigError("use_qk_norm false is not supported (MiniMax-M2 normalises q and k)")
    if hf.get("qk_norm_type", "per_layer") != "per_layer":
        raise ConfigError(f"qk_norm_type {hf['qk_norm_type']!r} is not supported; only 'per_layer'")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"scoring_func {hf['scoring_func']!r} is not supported; only 'sigmoid'")
    if hf.get("use_routing_bias", True) is False:
        raise ConfigError("use_routing_bias false is not supported")
    if hf.get("shared_intermediate_size"):
        raise ConfigError("shared experts (shared_intermediate_size > 0) are not supported")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"rope_type {rope_type!r} is not supported; only 'default'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu'")


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
        rotary_dim=8, rope_theta=5_000_000.0, intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, bos_token_id=505, eos_token_id=(507,)),
    "minimax-m2.5": ModelConfig(
        vocab_size=200064, hidden_size=3072, num_layers=62, num_heads=48, num_kv_heads=8,
        head_dim=128, rotary_dim=64, rope_theta=5_000_000.0, intermediate_size=1536,
        num_experts=256, num_experts_per_tok=8, max_position_embeddings=196608,
        bos_token_id=200034, eos_token_id=(200020,)),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
