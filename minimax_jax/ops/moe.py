"""Routed experts as a grouped GEMM.

Token-expert pairs are sorted by expert so each local expert's rows are contiguous, then two
grouped GEMMs run SwiGLU. Pairs whose expert lives elsewhere (expert parallelism) or that belong
to padding tokens sort past the last group and contribute exactly zero.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def ragged_dot_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


# measured best of five block shapes on an H200 at m = 512, 2048 and 32768 (docs/benchmarks.md)
MOSAIC_BLOCKS = dict(block_m=64, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def ragged_dot_mosaic(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Pallas Mosaic-GPU grouped GEMM (Hopper wgmma, TMA pipelines), bf16 in and out. Rows past
    the last group are left unwritten: callers mask them."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    block_n = 256 if w.shape[-1] % 256 == 0 else 128
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, block_n=block_n, **MOSAIC_BLOCKS)


def grouped_matmul(kernel: str, dtype) -> GroupedMatmul:
    """"xla" (lax.ragged_dot, the reference), "mosaic", or "auto": Mosaic on a Hopper GPU for
    bf16 (lax.ragged_dot ran at 12 TFLOP/s on an H200), the reference elsewhere."""
    if kernel == "auto":
        kind = jax.devices()[0].device_kind
        on_hopper = jax.default_backend() == "gpu" and ("H100" in kind or "H200" in kind)
        kernel = "mosaic" if on_hopper and dtype == jnp.bfloat16 else "xla"
    if kernel not in ("xla", "mosaic"):
        raise ValueError(f"moe kernel must be auto, xla or mosaic, got {kernel!r}")
    return ragged_dot_mosaic if kernel == "mosaic" else ragged_dot_reference


def routed_experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w13: jax.Array,
                   w2: jax.Array, first_expert: jax.Array | int,
                   matmul: GroupedMatmul = ragged_dot_reference) -> jax.Array:
    """Weighted sum over each token's routed experts among the local ones.

    x: [N, H]; expert_ids, weights: [N, k] (global ids; an id outside
    [first_expert, first_expert + local) contributes nothing); w13: [local, H, 2, I] gate and up;
    w2: [local, I, H]. Returns fp32 [N, H].
    """
    n, k = expert_ids.shape
    num_local, hidden, _, inter = w13.shape
    local = expert_ids - first_expert
    mine = (local >= 0) & (local < num_local)
    flat = jnp.where(mine, local, num_local).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_local + 1)[:num_local].astype(jnp.int32)
    rows = x[token]
    gate_up = matmul(rows, w13.reshape(num_local, hidden, 2 * inter), group_sizes)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    y = matmul(act, w2, group_sizes)
    row_weight = jnp.where(mine, weights, 0.0).reshape(-1)[order]
    in_group = jnp.arange(n * k) < jnp.sum(group_sizes)
    y = jnp.where(in_group[:, None], y * row_weight[:, None], 0.0)
    return jnp.zeros((n, hidden), jnp.float32).at[token].add(y)


def per_pair_experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w13: jax.Array,
                     w2: jax.Array, mine: jax.Array) -> jax.Array:
    """The same sum for few tokens: pair r = (token, choice) multiplies by its own expert's
    weights, gathered beforehand (w13: [N*k, H, 2, I], w2: [N*k, I, H]); pairs not `mine`
    contribute zero. Reads N*k experts instead of every local one. Returns fp32 [N, H]."""
    n, k = expert_ids.shape
    rows = jnp.repeat(x, k, axis=0)                                             # [N*k, H]
    gate_up = jnp.einsum("rh,rhji->rji", rows, w13, preferred_element_type=jnp.float32)
    act = (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]).astype(x.dtype)
    y = jnp.einsum("ri,rih->rh", act, w2, preferred_element_type=jnp.float32)
    y = jnp.where(mine.reshape(-1, 1), y * weights.reshape(-1, 1), 0.0)
    return y.reshape(n, k, -1).sum(axis=1)
