"""PartitionSpecs of every parameter, KV page and step input, per Layout.

Attention heads split over "tp" (column-parallel q/k/v, row-parallel o_proj, the joint-norm
weights following their heads); the lm_head splits the vocab over "tp"; experts go over all
devices ("dp", "tp") by expert (EP) or by intermediate dim (MoE-TP); everything else is
replicated. When tp exceeds the KV head count each KV head is copied to tp / num_kv_heads
devices, its k_norm slice with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import EXPERT_AXES, Layout

KV_SPEC = P(None, "dp", None, "tp", None)     # [layers, pages, page_size, kv_heads, head_dim]
STEP_SPEC = P("dp")                            # every step input: slots of all dp ranks


def param_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _axis_spec(ndim: int, axis: int, name) -> P:
    assert axis < ndim, (axis, ndim)
    return P(*[name if d == axis else None for d in range(ndim)])


def _moe_tp_axis(name: str, quantized: bool) -> int | None:
    """The intermediate-dim axis of an expert leaf [layers, experts, ...] (None: replicate)."""
    if name.endswith("_scale_2"):
        return None
    if name.startswith("w13"):
        return 3 if quantized or name != "w13" else 4      # [L,E,2,I,H*] or bf16 [L,E,H,2,I]
    return 3 if quantized or name != "w2" else 2           # [L,E,H,I*] or bf16 [L,E,I,H]


def param_spec(key: tuple[str, ...], leaf: jax.ShapeDtypeStruct | jax.Array, layout: Layout) -> P:
    """The spec of one parameter, by its path in the model state (and dtype, for experts)."""
    if key[:2] == ("layers", "experts"):
        if layout.moe == "ep":
            return _axis_spec(leaf.ndim, 1, EXPERT_AXES)
        quantized = not jnp.issubdtype(leaf.dtype, jnp.floating) or jnp.dtype(leaf.dtype).itemsize == 1
        axis = _moe_tp_axis(key[2], quantized)
        return P() if axis is None else _axis_spec(leaf.ndim, axis, EXPERT_AXES)
    table = {
        ("lm_head",): P(None, "tp"),
        # attention (model.Attention): output-channel rows; wqkv's rows are grouped by KV head
        ("layers", "attn", "wqkv"): P(None, "tp", None),
        ("layers", "attn", "wo"): P(None, None, "tp"),
        ("layers", "attn", "wqkv_fp8"): P(None, "tp", None),
        ("layers", "attn", "wqkv_fp8_scale"): P(None, "tp", None),
        ("layers", "attn", "wo_fp8"): P(None, None, "tp"),
        ("layers", "attn", "wo_fp8_scale"): P(None, None, "tp"),
        ("layers", "attn", "q_norm"): P(None, "tp"),
        ("layers", "attn", "k_norm"): P(None, "tp"),
    }
    return table.get(key[:3] if key[0] == "layers" else key[:1], P())


def state_specs(state: nnx.State, layout: Layout) -> Any:
    """A pytree of PartitionSpecs matching `state` leaf for leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: param_spec(param_key(path), leaf, layout), state)


# leaves holding KV heads, copied where tp exceeds their count
KV_HEAD_KEYS = {("layers", "attn", name) for name in ("k_norm", "wqkv", "wqkv_fp8", "wqkv_fp8_scale")}


def replicate_kv_heads(state: nnx.State, head_dim: int, replicas: int, num_kv_heads: int) -> nnx.State:
    """Repeats each KV head's columns of k_norm `replicas` times (tp > kv heads). In wqkv and
    wqkv_fp8 (rows grouped by KV head: its query heads, key, value) each KV head's group becomes
    `replicas` groups, each with its share of the query heads and a copy of the key and value."""
    if replicas == 1:
        return state

    def expand(path, leaf):
        key = param_key(path)
        if key not in KV_HEAD_KEYS:
            return leaf
        if key[-1].startswith("wqkv"):
            rows_per_head = head_dim // 128 if key[-1] == "wqkv_fp8_scale" else head_dim   # 128-row scales, or rows
            return _split_kv_groups(leaf, replicas, rows_per_head, num_kv_heads)
        *lead, width = leaf.shape
        heads = leaf.reshape(*lead, width // head_dim, 1, head_dim)
        heads = jnp.broadcast_to(heads, (*lead, width // head_dim, replicas, head_dim))
        return heads.reshape(*lead, width * replicas)
    return jax.tree_util.tree_map_with_path(expand, state)


def _split_kv_groups(leaf: jax.Array, replicas: int, rows_per_head: int, kv_heads: int) -> jax.Array:
    """[L, KVH * (G + 2) * rows_per_head, K] -> [L, KVH * replicas * (G / replicas + 2) * rows_per_head, K]."""
    layers, rows, k = leaf.shape
    groups = leaf.reshape(layers, kv_heads, rows // (kv_heads * rows_per_head), rows_per_head, k)
    g = groups.shape[2] - 2
    queries = groups[:, :, :g].reshape(layers, kv_heads, replicas, g // replicas, rows_per_head, k)
    shared = jnp.broadcast_to(groups[:, :, None, g:], (layers, kv_heads, replicas, 2, rows_per_head, k))
    return jnp.concatenate([queries, shared], axis=3).reshape(layers, -1, k)


def shard_state(state: nnx.State, layout: Layout, mesh: Mesh, head_dim: int, num_kv_heads: int) -> nnx.State:
    """Places a model state on the mesh (KV heads copied first where tp > their count)."""
    state = replicate_kv_heads(state, head_dim, layout.kv_head_replicas(num_kv_heads), num_kv_heads)
    specs = state_specs(state, layout)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
