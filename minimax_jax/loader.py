"""HF safetensors checkpoints -> MiniMaxM2 parameters.

Accepts the released tensor names (`block_sparse_moe.experts.E.w1/w2/w3`), the transformers-5
in-memory names (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), bf16/fp32 weights and the
released FP8 format (float8_e4m3fn `.weight` with one fp32 `.weight_scale_inv` per 128x128
block), which is dequantised into the compute dtype. Layers at index >= num_hidden_layers (the
MTP modules) are skipped.

Every tensor's presence and shape is checked from the headers before anything is read, so a bad
checkpoint fails with one line and nothing half-loaded. Tensors then stream from the mmap one
layer at a time into parameter arrays created on their target devices; the host never holds more
than one layer's tensors.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model import MiniMaxM2
from minimax_jax.safetensors_index import CheckpointError, SafetensorsIndex

log = logging.getLogger(__name__)
FP8_BLOCK = (128, 128)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def load_model(path: str | Path, dtype: Any = jnp.bfloat16,
               shardings: Callable[[tuple[str, ...]], Any] | None = None) -> MiniMaxM2:
    """Loads an HF MiniMax-M2 checkpoint directory into a model.

    shardings maps a parameter path (e.g. ('layers', 'attn', 'wq')) to the jax Sharding its array
    is created with; None puts everything on the default device.
    """
    cfg = ModelConfig.from_pretrained(path)
    index = SafetensorsIndex.from_dir(path)
    sources = CheckpointLayout(cfg, index)
    abstract = nnx.eval_shape(lambda: MiniMaxM2(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    sources.check(state)
    for key, leaf in _leaves(state):
        sharding = shardings(key) if shardings else None
        value = leaf.get_value()
        leaf.set_value(sources.load(key, value.shape, value.dtype, sharding))
    return nnx.merge(graphdef, state)


def _leaves(state: nnx.State) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(str(k) for k in path), leaf) for path, leaf in nnx.to_flat_state(state)]


class CheckpointLayout:
    """Where each of our parameters comes from in an HF checkpoint, and how it is converted."""

    def __init__(self, cfg: ModelConfig, index: SafetensorsIndex):
        self.cfg, self.index = cfg, index
        self.moe = self._moe_prefix()
        self.fused_experts = f"model.layers.0.{self.moe}.experts.gate_up_proj" in index

    # -- name tables ---------------------------------------------------------------------------

    def _moe_prefix(self) -> str:
        return "mlp" if "model.layers.0.mlp.gate.weight" in self.index else "block_sparse_moe"

    def layer_tensors(self, key: tuple[str, ...], layer: int) -> list[tuple[str, tuple[int, ...]]]:
        """HF names and HF shapes that make up one layer's slice of parameter `key`."""
        cfg, p = self.cfg, f"model.layers.{layer}."
        h, q, kv, e, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.num_experts, cfg.intermediate_size
        table = {
            ("attn_norm",): [(p + "input_layernorm.weight", (h,))],
            ("mlp_norm",): [(p + "post_attention_layernorm.weight", (h,))],
            ("attn", "wq"): [(p + "self_attn.q_proj.weight", (q, h))],
            ("attn", "wk"): [(p + "self_attn.k_proj.weight", (kv, h))],
            ("attn", "wv"): [(p + "self_attn.v_proj.weight", (kv, h))],
            ("attn", "wo"): [(p + "self_attn.o_proj.weight", (h, q))],
            ("attn", "q_norm"): [(p + "self_attn.q_norm.weight", (q,))],
            ("attn", "k_norm"): [(p + "self_attn.k_norm.weight", (kv,))],
            ("router", "weight"): [(p + f"{self.moe}.gate.weight", (e, h))],
            ("router", "bias"): [(p + f"{self.moe}.e_score_correction_bias", (e,))],
        }
        if self.fused_experts:
            table[("experts", "w13")] = [(p + f"{self.moe}.experts.gate_up_proj", (e, 2 * i, h))]
            table[("experts", "w2")] = [(p + f"{self.moe}.experts.down_proj", (e, h, i))]
        else:
            ex = p + f"{self.moe}.experts."
            table[("experts", "w13")] = [(f"{ex}{j}.{w}.weight", (i, h)) for j in range(e) for w in ("w1", "w3")]
            table[("experts", "w2")] = [(f"{ex}{j}.w2.weight", (h, i)) for j in range(e)]
        return table[key]

    def top_tensors(self, key: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
        cfg = self.cfg
        v, h = cfg.vocab_size, cfg.hidden_size
        if key == ("lm_head",) and cfg.tie_word_embeddings and "lm_head.weight" not in self.index:
            return [("model.embed_tokens.weight", (v, h))]
        return {("embed",): [("model.embed_tokens.weight", (v, h))],
                ("norm",): [("model.norm.weight", (h,))],
                ("lm_head",): [("lm_head.weight", (v, h))]}[key]

    def tensors_of(self, key: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
        if key[0] == "layers":
            return [t for layer in range(self.cfg.num_layers) for t in self.layer_tensors(key[1:], layer)]
        return self.top_tensors(key)

    # -- validation ----------------------------------------------------------------------------

    def check(self, state: nnx.State) -> None:
        """Fails with one line on a missing tensor, a wrong shape or a missing FP8 scale."""
        needed = [t for key, _ in _leaves(state) for t in self.tensors_of(key)]
        missing = [name for name, _ in needed if name not in self.index]
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")
        for name, shape in needed:
            info = self.index.tensors[name]
            if info.shape != shape:
                raise CheckpointError(f"tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
            if info.dtype == "F8_E4M3":
                self._check_fp8_scale(name, shape)
        self._warn_unused({name for name, _ in needed})

    def _check_fp8_scale(self, name: str, shape: tuple[int, ...]) -> None:
        scale = name.removesuffix(".weight") + ".weight_scale_inv"
        if scale not in self.index:
            raise CheckpointError(f"FP8 tensor {name} has no {scale}")
        expected = shape[:-2] + tuple(-(-s // b) for s, b in zip(shape[-2:], FP8_BLOCK))
        if self.index.tensors[scale].shape != expected:
            raise CheckpointError(
                f"tensor {scale} has shape {list(self.index.tensors[scale].shape)}, expected {list(expected)}")

    def _warn_unused(self, used: set[str]) -> None:
        unused = []
        for name in self.index.names():
            if name in used or name.endswith(".weight_scale_inv"):
                continue
            match = _LAYER_RE.match(name)
            if match and int(match.group(1)) >= self.cfg.num_layers:
                continue      # MTP modules: no published weights use them
            unused.append(name)
        if unused:
            log.warning("ignoring %d unknown tensor(s) in the checkpoint, e.g. %s", len(unused), unused[:4])

    # -- reading -------------------------------------------------------------------------------

    def read(self, name: str, dtype: Any) -> np.ndarray:
        """One HF tensor as a host array of `dtype`, FP8 blocks dequantised."""
        raw = self.index.read(name)
        if raw.dtype == jnp.float8_e4m3fn:
            from quant import fp8
            scale = self.index.read(name.removesuffix(".weight") + ".weight_scale_inv")
            with jax.default_device(jax.devices("cpu")[0]):
                return np.asarray(fp8.dequantize_blockwise(raw, scale, dtype=dtype, block=FP8_BLOCK))
        return raw.astype(dtype)

    def layer_value(self, key: tuple[str, ...], layer: int, dtype: Any) -> np.ndarray:
        """Our layout of one layer's slice: activations multiply from the left (x @ W)."""
        tensors = [self.read(name, dtype) for name, _ in self.layer_tensors(key, layer)]
        if key == ("experts", "w13"):
            e, i, h = self.cfg.num_experts, self.cfg.intermediate_size, self.cfg.hidden_size
            stacked = tensors[0].reshape(e, 2, i, h) if self.fused_experts else np.stack(tensors).reshape(e, 2, i, h)
            return stacked.transpose(0, 3, 1, 2)                  # [E, H, 2, I]
        if key == ("experts", "w2"):
            stacked = tensors[0] if self.fused_experts else np.stack(tensors)
            return stacked.transpose(0, 2, 1)                     # [E, I, H]
        (value,) = tensors
        return value.T if value.ndim == 2 else value

    def load(self, key: tuple[str, ...], shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
        if key[0] != "layers":
            (name, _), = self.top_tensors(key)
            value = self.read(name, dtype)
            value = value.T if key == ("lm_head",) else value
            return jax.device_put(value, sharding) if sharding else jnp.asarray(value)
        out = jnp.zeros(shape, dtype, device=sharding)
        for layer in range(self.cfg.num_layers):
            out = _set_layer(out, layer, self.layer_value(key[1:], layer, dtype))
        return out


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: int | jax.Array, value: np.ndarray | jax.Array) -> jax.Array:
    """Writes one layer's slice in place (the stacked array is donated, never copied)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, 0)
