"""HF safetensors checkpoints -> MiniMaxM2 parameters.

Sources: the released tensor names (`block_sparse_moe.experts.E.w1/w2/w3`) or the
transformers-5 in-memory names (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`); weights in
bf16/fp32, in the released FP8 format (float8_e4m3fn `.weight` with one fp32 `.weight_scale_inv`
per 128x128 block), or NVIDIA ModelOpt NVFP4 experts (uint8 `.weight` holding two E2M1 codes a
byte, float8_e4m3fn `.weight_scale` per 16 values, fp32 `.weight_scale_2`; `.input_scale` is not
needed by weight-only experts and may be absent). Layers at index >= num_hidden_layers (the MTP
modules) are skipped.

Targets: dense weights in the compute dtype; experts in bf16 (the compute dtype), FP8 blocks or
NVFP4 (`expert_format`); attention's projections in the compute dtype, or beside FP8 experts in
FP8 blocks (`model.attention_format`). A source already in the target format is copied bit for
bit; otherwise it is dequantised and, if asked, quantised again.

Every tensor's presence, dtype and shape is checked from the headers before anything is read, so
a bad checkpoint fails with one line and nothing half-loaded. Tensors then stream from the mmap
one layer at a time into parameter arrays created on their target devices; the host never holds
more than one layer's tensors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from minimax_jax.config import ModelConfig
from minimax_jax.model import MiniMaxM2, attention_format
from minimax_jax.safetensors_index import CheckpointError, SafetensorsIndex
from quant import fp8, nvfp4

log = logging.getLogger(__name__)
FP8_BLOCK = (128, 128)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
PROJECTIONS = {("attn", w) for w in ("wq", "wk", "wv", "wo")}
QUANTIZATION_TO_FORMAT = {None: "bf16", "bf16": "bf16", "fp8": "fp8", "modelopt_fp4": "nvfp4"}


def detect_quantization(path: str | Path) -> str | None:
    """The checkpoint's own quantization in sglang's names: "fp8", "modelopt_fp4" or None."""
    path = Path(path)
    hf_quant = path / "hf_quant_config.json"
    if hf_quant.exists():
        algo = json.loads(hf_quant.read_text()).get("quantization", {}).get("quant_algo")
        if algo == "NVFP4":
            return "modelopt_fp4"
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        return "fp8"
    if qc.get("quant_method") == "modelopt" and qc.get("quant_algo") == "NVFP4":
        return "modelopt_fp4"
    return None


def load_model(path: str | Path, dtype: Any = jnp.bfloat16, quantization: str | None = None,
               shardings: Callable[[tuple[str, ...], Any], Any] | None = None,
               progress: bool = False) -> MiniMaxM2:
    """Loads an HF MiniMax-M2 checkpoint directory.

    quantization: the experts' format on device in sglang's names ("fp8", "modelopt_fp4"), or
    None for the compute dtype. shardings(key, abstract_leaf) gives the jax Sharding of each
    parameter (key like ('layers', 'attn', 'wqkv')); None puts everything on the default device.
    """
    if quantization not in QUANTIZATION_TO_FORMAT:
        raise ValueError(f"quantization must be one of fp8, modelopt_fp4 or None, got {quantization!r}")
    cfg = ModelConfig.from_pretrained(path)
    source = CheckpointLayout(cfg, SafetensorsIndex.from_dir(path))
    expert_format = QUANTIZATION_TO_FORMAT[quantization]
    abstract = nnx.eval_shape(lambda: MiniMaxM2(cfg, dtype=dtype, expert_format=expert_format, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = _leaves(state)
    source.check()
    sharding = lambda key, leaf: shardings(key, leaf) if shardings else None
    arrays = {}
    for key, leaf in leaves:
        if key[0] != "layers":
            arrays[key] = source.load_top(key, leaf, sharding(key, leaf))
        else:
            arrays[key] = jnp.zeros(leaf.shape, leaf.dtype, device=sharding(key, leaf))
    for layer in tqdm(range(cfg.num_layers), desc="loading layers", disable=not progress):
        values = source.layer_values(layer, dtype, expert_format)
        for key, _ in leaves:
            if key[0] == "layers":
                arrays[key] = _set_layer(arrays[key], layer, values[key[1:]])
    for key, leaf in leaves:
        leaf.set_value(arrays[key])
    return nnx.merge(graphdef, state)


def _leaves(state: nnx.State) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for path, var in nnx.to_flat_state(state):
        out.append((tuple(str(k) for k in path), var))
    return out


class CheckpointLayout:
    """Where each of our parameters comes from in an HF checkpoint, and how it is converted."""

    def __init__(self, cfg: ModelConfig, index: SafetensorsIndex):
        self.cfg, self.index = cfg, index
        self.moe = "mlp" if "model.layers.0.mlp.gate.weight" in index else "block_sparse_moe"
        self.fused_experts = f"model.layers.0.{self.moe}.experts.gate_up_proj" in index
        self.expert_source = self._expert_source()

    def _expert_source(self) -> str:
        """"dense", "fp8" or "nvfp4", from the dtype of the first expert weight."""
        first = (f"model.layers.0.{self.moe}.experts.gate_up_proj" if self.fused_experts
                 else f"model.layers.0.{self.moe}.experts.0.w1.weight")
        dtype = self.index.tensors[first].dtype if first in self.index else None
        return {"F8_E4M3": "fp8", "U8": "nvfp4"}.get(dtype, "dense")

    # -- name tables ---------------------------------------------------------------------------

    def dense_tensors(self, layer: int) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
        cfg, p = self.cfg, f"model.layers.{layer}."
        h, q, kv, e = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.num_experts
        return {
            ("attn_norm",): (p + "input_layernorm.weight", (h,)),
            ("mlp_norm",): (p + "post_attention_layernorm.weight", (h,)),
            ("attn", "wq"): (p + "self_attn.q_proj.weight", (q, h)),
            ("attn", "wk"): (p + "self_attn.k_proj.weight", (kv, h)),
            ("attn", "wv"): (p + "self_attn.v_proj.weight", (kv, h)),
            ("attn", "wo"): (p + "self_attn.o_proj.weight", (h, q)),
            ("attn", "q_norm"): (p + "self_attn.q_norm.weight", (q,)),
            ("attn", "k_norm"): (p + "self_attn.k_norm.weight", (kv,)),
            ("router", "weight"): (p + f"{self.moe}.gate.weight", (e, h)),
            ("router", "bias"): (p + f"{self.moe}.e_score_correction_bias", (e,)),
        }

    def expert_prefixes(self, layer: int) -> tuple[list[str], list[str]]:
        """Name prefixes of a layer's expert linears: (w1, w3 of expert 0, w1, w3 of expert 1, ...),
        (w2 of each expert). In the fused form: ([gate_up_proj], [down_proj])."""
        ex = f"model.layers.{layer}.{self.moe}.experts."
        if self.fused_experts:
            return [ex + "gate_up_proj"], [ex + "down_proj"]
        experts = range(self.cfg.num_experts)
        return [f"{ex}{j}.{w}" for j in experts for w in ("w1", "w3")], [f"{ex}{j}.w2" for j in experts]

    def expert_linears(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name prefix, logical shape) of every expert linear of a layer."""
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        gate_up, down = self.expert_prefixes(layer)
        if self.fused_experts:
            return [(gate_up[0], (e, 2 * i, h)), (down[0], (e, h, i))]
        return [(p, (i, h)) for p in gate_up] + [(p, (h, i)) for p in down]

    def top_tensors(self) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
        v, h = self.cfg.vocab_size, self.cfg.hidden_size
        head = "lm_head.weight"
        if self.cfg.tie_word_embeddings and head not in self.index:
            head = "model.embed_tokens.weight"
        return {("embed",): ("model.embed_tokens.weight", (v, h)), ("norm",): ("model.norm.weight", (h,)),
                ("lm_head",): (head, (v, h))}

    # -- validation ----------------------------------------------------------------------------

    def expected(self) -> list[tuple[str, tuple[int, ...], str | None]]:
        """(name, shape, required dtype or None) of every tensor the model needs."""
        out = [(n, s, None) for n, s in self.top_tensors().values()]
        for layer in range(self.cfg.num_layers):
            out += [(n, s, None) for n, s in self.dense_tensors(layer).values()]
            for prefix, shape in self.expert_linears(layer):
                *lead, n, k = shape
                if self.fused_experts and self.expert_source != "dense":
                    raise CheckpointError("quantised experts in the fused gate_up_proj form are not supported")
                if self.expert_source == "nvfp4":
                    out += [(prefix + ".weight", (n, k // 2), "U8"),
                            (prefix + ".weight_scale", (n, k // 16), "F8_E4M3"),
                            (prefix + ".weight_scale_2", None, "F32")]
                else:
                    out.append((prefix + (".weight" if not self.fused_experts else ""), tuple(shape), None))
        return out

    def check(self) -> None:
        """Fails with one line on a missing tensor, a wrong shape or dtype, a missing FP8 scale."""
        needed = self.expected()
        missing = [name for name, _, _ in needed if name not in self.index]
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")
        for name, shape, dtype in needed:
            info = self.index.tensors[name]
            if shape is None:           # a per-tensor scalar scale: [] or [1]
                if int(np.prod(info.shape)) != 1:
                    raise CheckpointError(f"tensor {name} has shape {list(info.shape)}, expected a scalar")
                continue
            if info.shape != shape:
                raise CheckpointError(f"tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
            if dtype is not None and info.dtype != dtype:
                raise CheckpointError(f"tensor {name} has dtype {info.dtype}, expected {dtype}")
            if info.dtype == "F8_E4M3" and not name.endswith("weight_scale"):
                self._check_fp8_scale(name, shape)
        self._warn_unused({name for name, _, _ in needed})

    def _check_fp8_scale(self, name: str, shape: tuple[int, ...]) -> None:
        scale = _fp8_scale_name(name)
        if scale not in self.index:
            raise CheckpointError(f"FP8 tensor {name} has no {scale}")
        expected = shape[:-2] + tuple(-(-s // b) for s, b in zip(shape[-2:], FP8_BLOCK))
        if self.index.tensors[scale].shape != expected:
            raise CheckpointError(
                f"tensor {scale} has shape {list(self.index.tensors[scale].shape)}, expected {list(expected)}")

    def _warn_unused(self, used: set[str]) -> None:
        unused = []
        for name in self.index.names():
            if name in used or name.endswith((".weight_scale_inv", ".input_scale")):
                continue
            match = _LAYER_RE.match(name)
            if match and int(match.group(1)) >= self.cfg.num_layers:
                continue      # MTP modules: no published weights use them
            unused.append(name)
        if unused:
            log.warning("ignoring %d unknown tensor(s) in the checkpoint, e.g. %s", len(unused), unused[:4])

    # -- reading -------------------------------------------------------------------------------

    def read(self, name: str, dtype: Any) -> np.ndarray:
        """One dense or FP8 HF tensor as a host array of `dtype`, FP8 blocks dequantised."""
        raw, scale = self.read_raw(name)
        if scale is not None:
            return _on_host(fp8.dequantize_blockwise, raw, scale, dtype=dtype, block=FP8_BLOCK)
        return raw.astype(dtype)

    def read_raw(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """One HF tensor as stored, with its block scales if it is FP8 (else None)."""
        raw = self.index.read(name)
        return raw, self.index.read(_fp8_scale_name(name)) if raw.dtype == jnp.float8_e4m3fn else None

    def load_top(self, key: tuple[str, ...], leaf: Any, sharding: Any) -> jax.Array:
        name, _ = self.top_tensors()[key]
        value = self.read(name, leaf.dtype)
        value = value.T if key == ("lm_head",) else value
        return jax.device_put(value, sharding) if sharding else jnp.asarray(value)

    def layer_values(self, layer: int, dtype: Any, expert_format: str) -> dict[tuple[str, ...], np.ndarray]:
        """Every parameter's slice for one layer, in our layout (activations multiply from the
        left: x @ W, so dense [out, in] weights are transposed)."""
        out = {}
        dense = self.dense_tensors(layer)
        attention = (self.layer_attention_fp8(dense) if attention_format(self.cfg, expert_format) == "fp8"
                     else self.layer_attention(dense, dtype))
        out.update({("attn",) + k: v for k, v in attention.items()})
        dense = {k: v for k, v in dense.items() if k not in PROJECTIONS}
        for key, (name, _) in dense.items():
            value = self.read(name, jnp.float32 if key[0] == "router" else dtype)
            out[key] = value.T if value.ndim == 2 else value
        out.update({("experts",) + k: v for k, v in self.layer_experts(layer, dtype, expert_format).items()})
        return out

    def layer_attention(self, dense: dict, dtype: Any) -> dict[tuple[str, ...], np.ndarray]:
        """A layer's projections as `model.Attention` holds bf16 ones: the checkpoint's rows
        (output channels), q, k and v rows put together by KV head."""
        q, k, v, wo = (self.read(dense[("attn", w)][0], dtype) for w in ("wq", "wk", "wv", "wo"))
        return {("wqkv",): group_by_kv_head(q, k, v, self.cfg.num_kv_heads, self.cfg.head_dim), ("wo",): wo}

    def layer_attention_fp8(self, dense: dict) -> dict[tuple[str, ...], np.ndarray]:
        """A layer's projections as `model.Attention` holds FP8 ones: the checkpoint's e4m3
        blocks and scales as they are (or a dense checkpoint's, rounded to them), q, k and v rows
        put together by KV head. Whole blocks move: with heads of 128 no block spans two heads."""
        def blocks(key):
            raw, scale = self.read_raw(dense[key][0])
            if scale is not None:
                return raw, scale
            return tuple(np.asarray(a) for a in _on_host(fp8.quantize_blockwise, raw.astype(np.float32),
                                                         block=FP8_BLOCK))

        (q, q_scale), (k, k_scale), (v, v_scale) = (blocks(("attn", w)) for w in ("wq", "wk", "wv"))
        heads, d = self.cfg.num_kv_heads, self.cfg.head_dim
        wo, wo_scale = blocks(("attn", "wo"))
        return {("wqkv_fp8",): group_by_kv_head(q, k, v, heads, d),
                ("wqkv_fp8_scale",): group_by_kv_head(q_scale, k_scale, v_scale, heads, d // FP8_BLOCK[0]),
                ("wo_fp8",): wo, ("wo_fp8_scale",): wo_scale}

    def layer_experts(self, layer: int, dtype: Any, expert_format: str) -> dict[tuple[str, ...], np.ndarray]:
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        gate_up, down = self.expert_prefixes(layer)
        raw = lambda prefixes, suffix: np.stack([self.index.read(p + suffix) for p in prefixes])
        if self.expert_source == expert_format == "fp8":
            return {("w13",): raw(gate_up, ".weight").reshape(e, 2, i, h),
                    ("w13_scale",): raw(gate_up, ".weight_scale_inv").reshape(e, 2, -(-i // 128), -(-h // 128)),
                    ("w2",): raw(down, ".weight"), ("w2_scale",): raw(down, ".weight_scale_inv")}
        if self.expert_source == expert_format == "nvfp4":
            scalar = lambda prefixes: raw(prefixes, ".weight_scale_2").reshape(-1).astype(np.float32)
            return {("w13",): raw(gate_up, ".weight").reshape(e, 2, i, h // 2),
                    ("w13_scale",): raw(gate_up, ".weight_scale").reshape(e, 2, i, h // 16),
                    ("w13_scale_2",): scalar(gate_up).reshape(e, 2),
                    ("w2",): raw(down, ".weight"), ("w2_scale",): raw(down, ".weight_scale"),
                    ("w2_scale_2",): scalar(down)}
        w13, w2 = self.dense_experts(layer)               # [E, 2, I, H], [E, H, I] float32
        if expert_format == "bf16":
            return {("w13",): w13.transpose(0, 3, 1, 2).astype(dtype), ("w2",): w2.transpose(0, 2, 1).astype(dtype)}
        if expert_format == "fp8":
            q13, s13 = _on_host(fp8.quantize_blockwise, w13, block=FP8_BLOCK)
            q2, s2 = _on_host(fp8.quantize_blockwise, w2, block=FP8_BLOCK)
            return {("w13",): q13, ("w13_scale",): s13, ("w2",): q2, ("w2_scale",): s2}
        q13, q2 = quantize_experts_nvfp4(w13), quantize_experts_nvfp4(w2)
        return {("w13",): q13.codes, ("w13_scale",): q13.scales, ("w13_scale_2",): q13.global_scale[..., 0, 0],
                ("w2",): q2.codes, ("w2_scale",): q2.scales, ("w2_scale_2",): q2.global_scale[..., 0, 0]}

    def dense_experts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """A layer's experts dequantised to float32, rows = output channels."""
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        gate_up, down = self.expert_prefixes(layer)
        if self.fused_experts:
            return self.read(gate_up[0], np.float32).reshape(e, 2, i, h), self.read(down[0], np.float32)
        read = self.read_nvfp4 if self.expert_source == "nvfp4" else (lambda p: self.read(p + ".weight", np.float32))
        return np.stack([read(p) for p in gate_up]).reshape(e, 2, i, h), np.stack([read(p) for p in down])

    def read_nvfp4(self, prefix: str) -> np.ndarray:
        q = nvfp4.NVFP4Array(self.index.read(prefix + ".weight"), self.index.read(prefix + ".weight_scale"),
                             self.index.read(prefix + ".weight_scale_2").reshape(()).astype(np.float32))
        return _on_host(nvfp4.dequantize, q, jnp.float32)


def _fp8_scale_name(name: str) -> str:
    """The block scales' tensor of an FP8 `.weight`."""
    return name.removesuffix(".weight") + ".weight_scale_inv"


def group_by_kv_head(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int, rows_per_head: int) -> np.ndarray:
    """Rows [Q, K], [KV, K], [KV, K] (q, k, v projections; per head rows_per_head rows) ->
    [KVH * (G + 2) * rows_per_head, K]: each KV head's query heads, then its key, then its value."""
    per_head = lambda a: a.reshape(kv_heads, -1, rows_per_head, a.shape[-1])  # noqa: E731
    return np.concatenate([per_head(q), per_head(k), per_head(v)], axis=1).reshape(-1, q.shape[-1])


def quantize_experts_nvfp4(w: np.ndarray) -> nvfp4.NVFP4Array:
    """[..., N, K] expert weights -> NVFP4 with one global scale per expert linear (ModelOpt's
    weight_scale_2: amax over the linear's [N, K] / (6 * 448))."""
    amax = np.max(np.abs(np.where(np.isfinite(w), w, 0)), axis=(-2, -1), keepdims=True)
    g = np.where(amax > 0, amax / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX), 1.0).astype(np.float32)
    return _on_host(nvfp4.quantize, w, g)


def _on_host(fn: Callable, *args, **kwargs):
    """Runs a quant function on the host CPU device and returns numpy (no accelerator memory
    held). A process whose JAX was started without its CPU backend (`JAX_PLATFORMS=cuda`) runs
    it on the default device instead, one tensor at a time."""
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:        # "Unknown backend cpu"
        host = None
    with contextlib.nullcontext() if host is None else jax.default_device(host):
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: int | jax.Array, value: np.ndarray | jax.Array) -> jax.Array:
    """Writes one layer's slice in place (the stacked array is donated, never copied)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, 0)
