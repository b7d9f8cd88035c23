"""MiniMax-M2 in Flax NNX.

The math of one decoder layer lives in `DecoderLayer.__call__`, which is also the layer's
communication schedule: every point where tokens or partial sums cross devices is a call on a
`Comm` object. `LocalComm` (here) makes those calls identities for one device; the mesh version
lives in `sharding.collectives` and runs the same code inside `jax.shard_map`, where every
parameter is the local shard. So nothing here reads a mesh or a device count: head counts and
expert counts come from the (possibly local) shapes of the weights.

Layer parameters are stacked along a leading layer axis and run by `jax.lax.scan`, so compile
time does not grow with depth. The scan slices every layer's parameters but the experts' and
FP8 attention's: those stay stacked and each layer is given its index (`Experts.__call__`,
`Attention`), so a kernel can read its layer in place instead of from a slice XLA copies first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.ops import attention as attn_ops
from minimax_jax.ops import attention_inputs, decode_attention, fp8_linear
from minimax_jax.ops import moe as moe_ops
from minimax_jax.ops import pair_experts
from minimax_jax.ops import routing
from quant import fp8, nvfp4


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInput:
    """The tokens of one forward step, padded to a bucket: B sequence slots of T tokens.

    positions are absolute positions in each sequence; page_table maps each slot's sequence to
    its KV pages; padding tokens (valid False) write no KV entry and are routed to no expert.
    fresh (static): every slot's tokens start its sequence at position 0, valid ones first, so a
    prefill chunk's attention needs no keys but its own (the host knows; a compile of its own).
    """
    tokens: jax.Array       # [B, T] int32
    positions: jax.Array    # [B, T] int32
    valid: jax.Array        # [B, T] bool
    page_table: jax.Array   # [B, P] int32
    fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))


class Comm(Protocol):
    """The communication points of a decoder layer (identity on one device)."""

    def own_tokens(self, x: jax.Array) -> jax.Array: ...
    def gather_tokens(self, h: jax.Array) -> jax.Array: ...
    def qk_sum_squares(self, ss: jax.Array) -> jax.Array: ...
    def reduce_attention(self, o: jax.Array) -> jax.Array: ...
    def moe(self, h: jax.Array, expert_ids: jax.Array, weights: jax.Array,
            experts: "Experts", layer: jax.Array | None = None) -> jax.Array: ...
    def finish_residual(self, r: jax.Array, m: jax.Array) -> jax.Array: ...
    def gather_logits(self, logits: jax.Array) -> jax.Array: ...


class LocalComm:
    """One device: every token and every weight is here.

    fp4_dispatch rounds the MoE input through NVFP4 as the mesh's FP4 all-gather does, so the
    single-device model is the reference for that path too."""

    def __init__(self, fp4_dispatch: bool = False):
        self.fp4_dispatch = fp4_dispatch

    def own_tokens(self, x):
        return x

    def gather_tokens(self, h):
        return h

    def qk_sum_squares(self, ss):
        return ss

    def reduce_attention(self, o):
        return o

    def moe(self, h, expert_ids, weights, experts, layer=None):
        if not self.fp4_dispatch:
            return experts(h, expert_ids, weights, first_expert=0, layer=layer)
        rounded = experts.token_rounding(expert_ids.size) is not None
        x = moe_ops.nvfp4_dispatch_tokens(*moe_ops.nvfp4_dispatch_payload(h), h, rounded)
        return experts(x, expert_ids, weights, first_expert=0, layer=layer, rounded=rounded)

    def finish_residual(self, r, m):
        return r + m.astype(r.dtype)

    def gather_logits(self, logits):
        return logits


def project(x: jax.Array, w: jax.Array, precision: jax.lax.Precision | None = None) -> jax.Array:
    """x [N, K] @ w [K, M]. A single row is computed as two: XLA's GPU compiler rewrites a
    one-row dot into an elementwise multiply and a reduction, writing the [K, M] product out and
    reading it back (three times the weight bytes, two kernels), which measured 75 us per layer
    for one decode token's attention projections on an H200 against about 10 us as a GEMM."""
    if x.shape[0] != 1:
        return jnp.matmul(x, w, precision=precision)
    # the barrier keeps the simplifier from moving the slice back into the dot
    return jax.lax.optimization_barrier(jnp.matmul(jnp.concatenate([x, x]), w, precision=precision))[:1]


def fp32_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, K] @ w [K, M] (w float32) with fp32 products, as transformers' router takes them
    (XLA's default on GPUs rounds fp32 operands to TF32, 10-bit mantissas; docs/benchmarks.md run
    DM). For bf16 x, w splits exactly into three parts of 8 significant bits each (`bf16_parts`),
    whose products with x are exact in fp32: one bf16 GEMM against the parts side by side, with
    fp32 sums, runs on tensor cores where `Precision.HIGHEST` takes an fp32 GEMM without them.
    Other x take `Precision.HIGHEST`."""
    if x.dtype != jnp.bfloat16:
        return project(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    side_by_side = jnp.concatenate(bf16_parts(w)[::-1], axis=-1)      # smallest first: summed first
    products = jnp.dot(x, side_by_side, precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32)
    lo, mid, hi = jnp.split(products, 3, axis=-1)
    return (lo + mid) + hi


def bf16_parts(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Three bf16 arrays that sum to float32 w exactly: each takes the top 8 significant bits of
    what the ones before left, by truncating the bits (a rounding cast would do, but XLA on GPUs
    may drop an f32 -> bf16 -> f32 round trip as excess precision, which run DO measured as
    2.5e-4 off)."""
    parts, rest = [], w.astype(jnp.float32)
    for _ in range(3):
        bits = jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        part = jax.lax.bitcast_convert_type(bits, jnp.float32)
        parts.append(part.astype(jnp.bfloat16))
        rest = rest - part
    return tuple(parts)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as transformers computes it: fp32 statistics, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """NeoX-style (half rotation) RoPE on the first rotary_dim dims. x: [B, T, heads, D]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def attention_format(cfg: ModelConfig, expert_format: str) -> str:
    """How attention's projections are held: "fp8" (W8A8 on the released checkpoint's 128 x 128
    blocks, `Attention`) beside FP8 experts when every block lies within one head, else "bf16"."""
    aligned = cfg.head_dim % fp8_linear.BLOCK == 0 and cfg.hidden_size % fp8_linear.BLOCK == 0
    return "fp8" if expert_format == "fp8" and aligned else "bf16"


# attention's projections stay stacked over layers in the layer loop: its kernels read them in place
ATTENTION_WEIGHTS = ("wqkv", "wo", "wqkv_fp8", "wqkv_fp8_scale", "wo_fp8", "wo_fp8_scale")
# and the qk norms' weights: a layer's slice handed to a kernel was a copy of its own, two a layer
# (`ops.attention_inputs` indexes the layer)
QK_NORMS = ("q_norm", "k_norm")


class Attention(nnx.Module):
    """GQA attention with one RMSNorm over all q heads and one over all k heads, partial RoPE.

    Projections in one of two formats, rows = output channels as checkpoints store them, wqkv's
    rows grouped by KV head (its G query heads, its key, its value: column-parallel sharding over
    whole KV heads keeps each device's rows contiguous, and one product makes all three):
      bf16  wqkv [KVH * (G + 2) * D, H] and wo [H, Q] in the compute dtype
      fp8   the released checkpoint's blocks: wqkv_fp8 [KVH * (G + 2) * D, H] float8_e4m3fn with
            wqkv_fp8_scale [rows / 128, H / 128]; wo_fp8 [H, Q] with wo_fp8_scale [H / 128, Q / 128];
            run W8A8 (`ops.fp8_linear`)
    In the layer loop both stay stacked over layers (`ATTENTION_WEIGHTS`) and the layer's index is
    given: a few decode rows take Triton kernels that read the layer in place (`_few_rows_decode`).
    """

    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs, weight_format: str = "bf16"):
        h = cfg.hidden_size
        self.format = weight_format
        if weight_format == "bf16":
            self.wqkv = _normal(rngs, (cfg.q_size + 2 * cfg.kv_size, h), dtype)
            self.wo = _normal(rngs, (h, cfg.q_size), dtype)
        elif weight_format == "fp8":      # random e4m3 values, scaled to std 0.02
            rows = cfg.q_size + 2 * cfg.kv_size
            block = fp8_linear.BLOCK
            self.wqkv_fp8 = _normal(rngs, (rows, h), jnp.float8_e4m3fn, std=1.0)
            self.wqkv_fp8_scale = nnx.Param(jnp.full((rows // block, h // block), 0.02, jnp.float32))
            self.wo_fp8 = _normal(rngs, (h, cfg.q_size), jnp.float8_e4m3fn, std=1.0)
            self.wo_fp8_scale = nnx.Param(jnp.full((h // block, cfg.q_size // block), 0.02, jnp.float32))
        else:
            raise ValueError(f"attention weight format must be bf16 or fp8, got {weight_format!r}")
        self.q_norm = nnx.Param(jnp.ones((cfg.q_size,), dtype))
        self.k_norm = nnx.Param(jnp.ones((cfg.kv_size,), dtype))
        self.cfg = cfg
        self.backend = "xla"        # ops.attention.resolve_backend; the engine sets its choice
        self.decode_backend = "xla"  # ops.attention.resolve_decode_backend; likewise
        self.projection_kernel = "auto"  # ops.fp8_linear.resolve_kernel (fp8), fp8_linear.takes_few_rows (bf16)

    def __call__(self, h: jax.Array, kv: tuple[jax.Array, jax.Array], layer: jax.Array, step: StepInput,
                 comm: Comm) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """h: [B*T, H] all tokens of this rank. layer: this layer's index, into the KV cache and,
        for fp8 weights, into the weights (held for every layer). Returns o_proj partial sums and
        the new cache."""
        cfg = self.cfg
        b, t = step.tokens.shape
        if self._decodes_few_rows(h, t, kv[0]):
            out, kv = self._few_rows_decode(h, kv, layer, step, comm)
            return self._output_projection(out, layer), kv
        q, k, v = self._qkv(h, layer)
        q, k = self._joint_qk_norm(q, k, comm, layer)
        d = cfg.head_dim
        q = rope(q.reshape(b, t, -1, d), step.positions, cfg.rotary_dim, cfg.rope_theta)
        k = rope(k.reshape(b, t, -1, d), step.positions, cfg.rotary_dim, cfg.rope_theta)
        v = v.reshape(b, t, -1, d)
        k_cache, v_cache = kv
        pages, page_size = k_cache.shape[1:3]
        slots = attn_ops.kv_slots(step.positions, step.valid, step.page_table, page_size, pages)
        k_cache = attn_ops.write_kv(k_cache, k.reshape(b * t, -1, d), slots.reshape(-1), layer)
        v_cache = attn_ops.write_kv(v_cache, v.reshape(b * t, -1, d), slots.reshape(-1), layer)
        out = attn_ops.paged_attention(q, k_cache, v_cache, step.page_table, step.positions, layer,
                                       attn_ops.resolve_backend(self.backend, q.dtype),
                                       attn_ops.resolve_decode_backend(self.decode_backend, q.dtype),
                                       chunk_kv=(k, v) if step.fresh else None)
        return self._output_projection(out.reshape(b * t, -1), layer), (k_cache, v_cache)

    def _projection(self, x: jax.Array, name: str, layer: jax.Array) -> jax.Array:
        """x @ the layer's wqkv or wo (name) transposed: rows = output channels."""
        if self.format == "fp8":
            w, scale = getattr(self, name + "_fp8")[...], getattr(self, name + "_fp8_scale")[...]
            return fp8_linear.fp8_linear(x, w, scale, layer, self.projection_kernel)
        w = getattr(self, name)[...]
        if w.ndim == 2:     # one layer's module
            return project(x, w.T)
        if fp8_linear.takes_few_rows(self.projection_kernel, x.shape[0], w):
            return fp8_linear.few_rows(x, w, None, layer, interpret=jax.default_backend() != "gpu")
        return project(x, w[layer].T)

    def _output_projection(self, out: jax.Array, layer: jax.Array) -> jax.Array:
        """o_proj of the attention's output [N, local q heads * D]: partial sums over the heads here."""
        return self._projection(out, "wo", layer)

    def _few_rows_kernel(self, rows: int) -> bool:
        """Whether `rows` rows' projections take the few-rows kernel (`ops.fp8_linear.few_rows`)."""
        if self.format == "fp8":
            return fp8_linear.resolve_kernel(self.projection_kernel, rows, self.wqkv_fp8[...]) == "triton-w8a16"
        return all(fp8_linear.takes_few_rows(self.projection_kernel, rows, w[...]) for w in (self.wqkv, self.wo))

    def _decodes_few_rows(self, h: jax.Array, t: int, k_cache: jax.Array) -> bool:
        """Whether this step takes `_few_rows_decode`: at most 16 rows (the attention-input kernels'
        partial sums) whose projections take the few-rows kernel, one query per slot, and the
        decode attention kernel."""
        cfg = self.cfg
        stacked = (self.wqkv_fp8 if self.format == "fp8" else self.wqkv).ndim == 3
        return (t == 1 and stacked and h.shape[0] <= fp8_linear.FEW_ROWS and self._few_rows_kernel(h.shape[0])
                and attn_ops.resolve_decode_backend(self.decode_backend, h.dtype) == "pallas"
                and decode_attention.supports(k_cache)
                and attention_inputs.supports(cfg.head_dim, cfg.rotary_dim, k_cache.shape[3], k_cache))

    def _few_rows_decode(self, h: jax.Array, kv: tuple[jax.Array, jax.Array], layer: jax.Array, step: StepInput,
                         comm: Comm) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """A few decode rows from the qkv projection to the attention's output [N, local q heads * D]
        in Triton kernels (`ops.attention_inputs`): the numbers of the path below, in four
        kernels where XLA ran eleven small ones between the projections."""
        cfg, d = self.cfg, self.cfg.head_dim
        interpret = jax.default_backend() != "gpu"
        k_cache, v_cache = kv
        rows, kv_heads = h.shape[0], k_cache.shape[3]
        group = self.q_norm.shape[-1] // self.k_norm.shape[-1]
        w, scale = ((self.wqkv_fp8[...], self.wqkv_fp8_scale[...]) if self.format == "fp8" else
                    (self.wqkv[...], None))
        parts = fp8_linear.few_rows(h, w, scale, layer, partial_sums=True, interpret=interpret)
        sums = attention_inputs.sums_of_squares(parts, rows, kv_heads, group, d, h.dtype, interpret=interpret)
        pages, page_size = k_cache.shape[1:3]
        slots = attn_ops.kv_slots(step.positions, step.valid, step.page_table, page_size, pages)
        q, k_cache, v_cache = attention_inputs.finish(
            parts, comm.qk_sum_squares(sums), self.q_norm[...], self.k_norm[...], step.positions.reshape(-1),
            slots.reshape(-1), k_cache, v_cache, layer, group=group, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta,
            q_size=cfg.q_size, kv_size=cfg.kv_size, eps=cfg.rms_norm_eps, dtype=h.dtype, interpret=interpret)
        out = decode_attention.paged_decode_attention(q, k_cache, v_cache, step.page_table, step.positions, layer,
                                                      group=group, interpret=interpret)
        return out.reshape(rows, -1), (k_cache, v_cache)

    def _qkv(self, h: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [N, local q heads * D], k and v [N, local KV heads * D]."""
        qkv = self._projection(h, "wqkv", layer)
        group = self.q_norm.shape[-1] // self.k_norm.shape[-1]     # query heads per KV head (local)
        qkv = qkv.reshape(h.shape[0], -1, group + 2, self.cfg.head_dim)
        flat = lambda a: a.reshape(h.shape[0], -1)  # noqa: E731
        return flat(qkv[:, :, :group]), flat(qkv[:, :, group]), flat(qkv[:, :, group + 1])

    def _joint_qk_norm(self, q: jax.Array, k: jax.Array, comm: Comm, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One RMSNorm over the whole q projection and one over the whole k projection.

        With heads split over devices each holds part of the projection, so the fp32 sums of
        squares are reduced once ([N, 2]) before scaling. The norms' weights are held for every
        layer in the layer loop (`QK_NORMS`) and indexed here.
        """
        cfg = self.cfg
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        ss = jnp.stack([jnp.sum(qf * qf, -1), jnp.sum(kf * kf, -1)], axis=-1)
        ss = comm.qk_sum_squares(ss)
        q_scale = jax.lax.rsqrt(ss[:, 0:1] / cfg.q_size + cfg.rms_norm_eps)
        k_scale = jax.lax.rsqrt(ss[:, 1:2] / cfg.kv_size + cfg.rms_norm_eps)
        q_norm, k_norm = (w if w.ndim == 1 else w[layer] for w in (self.q_norm[...], self.k_norm[...]))
        q = q_norm * (qf * q_scale).astype(q.dtype)
        k = k_norm * (kf * k_scale).astype(k.dtype)
        return q, k


ROUTER_KERNELS = ("auto", "xla", "triton")


class Router(nnx.Module):
    """Sigmoid scores in fp32; top-k by score + correction bias; weights are the unbiased scores
    of the chosen experts, renormalised. Padding tokens choose no expert (id = num_experts).

    In the layer loop the weights stay stacked over layers and the layer's index is given: up to
    16 tokens (`ops.routing.supports`) take two Triton kernels that read the layer in place
    (kernel "triton", and "auto" on GPUs; the interpreter elsewhere), more take XLA's GEMM on the
    layer's slice and one Triton kernel for the choice (`ops.routing.choose_many`); kernel "xla"
    and other shapes take XLA's ops."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.weight = _normal(rngs, (cfg.hidden_size, cfg.num_experts), jnp.float32)
        self.bias = nnx.Param(jnp.zeros((cfg.num_experts,), jnp.float32))
        self.top_k = cfg.num_experts_per_tok
        self.scaling = cfg.routed_scaling_factor
        self.kernel = "auto"

    def __call__(self, h: jax.Array, valid: jax.Array, layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        weight, bias = self.weight[...], self.bias[...]
        if weight.ndim == 3:        # [L, H, E]: held whole by the layer loop
            if self.kernel not in ROUTER_KERNELS:
                raise ValueError(f"router kernel must be one of {', '.join(ROUTER_KERNELS)}, got {self.kernel!r}")
            on_gpu = jax.default_backend() == "gpu"
            kernels = self.kernel == "triton" or self.kernel == "auto" and on_gpu
            if kernels and routing.supports(h.shape[0], h.shape[1], weight.shape[-1], self.top_k):
                return routing.route_few(h, weight, bias, layer, valid, self.top_k, self.scaling,
                                         interpret=not on_gpu)
            if kernels and routing.supports_many(h.shape[0], weight.shape[-1], self.top_k):
                return routing.choose_many(fp32_product(h, weight[layer]), bias, layer, valid, self.top_k,
                                           self.scaling, interpret=not on_gpu)
            weight, bias = weight[layer], bias[layer]
        scores = jax.nn.sigmoid(fp32_product(h, weight))
        _, ids = jax.lax.top_k(scores + bias, self.top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True) * self.scaling
        num_experts = scores.shape[-1]
        keep = valid[:, None] != 0
        ids = jnp.where(keep, ids, num_experts).astype(jnp.int32)
        return ids, jnp.where(keep, weights, 0.0)


EXPERT_FORMATS = ("bf16", "fp8", "nvfp4")


class Experts(nnx.Module):
    """SwiGLU experts: w2 @ (silu(w1 @ x) * (w3 @ x)); gate (w1) and up (w3) stored together.

    Weights are held in one of three formats and used weight-only (dequantised to the compute
    dtype inside the expert computation):
      bf16   w13 [E, H, 2, I], w2 [E, I, H] in the compute dtype
      fp8    the released format, rows = output channels: w13 float8_e4m3fn [E, 2, I, H] with
             fp32 w13_scale [E, 2, I/128, H/128] (one per 128x128 block), w2 [E, H, I] with
             w2_scale [E, H/128, I/128]
      nvfp4  ModelOpt's format: w13 uint8 codes [E, 2, I, H/2], w13_scale float8_e4m3fn
             [E, 2, I, H/16], w13_scale_2 fp32 [E, 2]; w2 [E, H, I/2], w2_scale [E, H, I/16],
             w2_scale_2 [E]
    """

    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs, expert_format: str = "bf16"):
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.format, self.dtype, self.num_experts = expert_format, dtype, e
        self.kernel = "auto"        # grouped GEMM implementation, see ops.moe.resolve_kernel
        self.fuse_swiglu = True     # mosaic-ws-w8a8: SwiGLU in the gate/up kernel (ops.moe.fp8_matmuls)
        if expert_format == "bf16":
            self.w13 = _normal(rngs, (e, h, 2, i), dtype)
            self.w2 = _normal(rngs, (e, i, h), dtype)
        elif expert_format == "fp8":      # random e4m3 values, scaled to std 0.02
            self.w13 = _normal(rngs, (e, 2, i, h), jnp.float8_e4m3fn, std=1.0)
            self.w13_scale = nnx.Param(jnp.full((e, 2, -(-i // 128), -(-h // 128)), 0.02, jnp.float32))
            self.w2 = _normal(rngs, (e, h, i), jnp.float8_e4m3fn, std=1.0)
            self.w2_scale = nnx.Param(jnp.full((e, -(-h // 128), -(-i // 128)), 0.02, jnp.float32))
        elif expert_format == "nvfp4":    # uniform random codes, std ~0.02 after scaling
            codes = lambda shape: nnx.Param(jax.random.bits(rngs.params(), shape, jnp.uint8))
            scale = lambda shape: nnx.Param(jnp.full(shape, 0.01, jnp.float32).astype(jnp.float8_e4m3fn))
            self.w13, self.w13_scale = codes((e, 2, i, h // 2)), scale((e, 2, i, h // 16))
            self.w13_scale_2 = nnx.Param(jnp.ones((e, 2), jnp.float32))
            self.w2, self.w2_scale = codes((e, h, i // 2)), scale((e, h, i // 16))
            self.w2_scale_2 = nnx.Param(jnp.ones((e,), jnp.float32))
        else:
            raise ValueError(f"expert format must be one of {EXPERT_FORMATS}, got {expert_format!r}")

    def weights(self, experts: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(w13 [n, H, 2, I], w2 [n, I, H]) of the n listed local experts in the compute dtype
        (gathered before dequantising, so only those are read)."""
        pick = lambda a: a[experts]  # noqa: E731
        if self.format == "bf16":
            return pick(self.w13[...]), pick(self.w2[...])
        w13, w2 = self._dequantized(pick)
        return w13.transpose(0, 3, 1, 2), w2.transpose(0, 2, 1)

    def _dequantized(self, pick=lambda a: a) -> tuple[jax.Array, jax.Array]:
        """Quantised experts in the compute dtype as stored (rows = output channels):
        w13 [E, 2, I, H], w2 [E, H, I]."""
        if self.format == "fp8":
            w13 = fp8.dequantize_blockwise(pick(self.w13[...]), pick(self.w13_scale[...]), self.dtype)
            w2 = fp8.dequantize_blockwise(pick(self.w2[...]), pick(self.w2_scale[...]), self.dtype)
        else:
            w13 = nvfp4.dequantize(nvfp4.NVFP4Array(pick(self.w13[...]), pick(self.w13_scale[...]),
                                                    pick(self.w13_scale_2[...])[..., None, None]), self.dtype)
            w2 = nvfp4.dequantize(nvfp4.NVFP4Array(pick(self.w2[...]), pick(self.w2_scale[...]),
                                                   pick(self.w2_scale_2[...])[..., None, None]), self.dtype)
        return w13, w2

    @property
    def num_local(self) -> int:
        return self.w13.shape[-4]          # every format's w13 is 4-D per layer

    def _path(self, num_pairs: int) -> tuple[str, bool]:
        """(the grouped GEMM kernel, whether `num_pairs` token-expert pairs instead read only
        their own experts)."""
        inter = self.w13.shape[-1] if self.format == "bf16" else self.w13.shape[-2]    # this device's share
        hidden = self.w13.shape[-3] if self.format == "bf16" else self.w2.shape[-2]
        kernel = moe_ops.resolve_kernel(self.kernel, self.format, hidden, inter, dtype=self.dtype)
        # A few tokens read only their own experts, duplicates included; the grouped kernels read
        # each touched expert once but cost more to set up. On one H200 (docs/benchmarks.md runs
        # FD-FF) the pairs won up to 8 tokens on 256 experts (NVFP4 at 62 layers: 2 tokens 8.8
        # against 13.0 ms a step, 8 tokens 21.7 against 21.9) and lost at 16 (30.7 against 24.8;
        # FP8 at 16 layers 10.6 against 9.9).
        per_pair = num_pairs * 4 <= self.num_local and self.kernel not in moe_ops.FP8_KERNELS
        return kernel, per_pair

    def token_rounding(self, num_pairs: int) -> Callable[[jax.Array], Any] | None:
        """How this layer's expert GEMMs round `num_pairs` pairs' tokens before gathering their
        rows (the W8A8 kernels: FP8 codes and a scale per row and 128 columns), or None. A
        dispatch may round its tokens where they live and gather the result: pass it back with
        rounded=True."""
        kernel, per_pair = self._path(num_pairs)
        return None if per_pair else moe_ops.token_rounding(kernel)

    def __call__(self, x: Any, expert_ids: jax.Array, weights: jax.Array, first_expert: jax.Array | int,
                 layer: jax.Array | None = None, out_dtype=jnp.float32, rounded: bool = False) -> jax.Array:
        """The routed experts' weighted sum [N, H], summed in fp32, in out_dtype. x: [N, H], or
        with rounded what `token_rounding` made of it. layer: this module's arrays hold every
        layer's experts ([L, ...]) and this layer's run; the Mosaic FP8 kernels and the NVFP4
        kernel read them in place, and so do a few pairs' FP8 and NVFP4 kernels on Hopper GPUs
        (`ops.pair_experts`); every other path takes the layer's slice."""
        share = self.num_local / self.num_experts
        kernel, per_pair = self._path(expert_ids.size)
        if layer is not None and self.w13.ndim != 5:
            raise ValueError(f"a layer index needs experts stacked over layers (w13 [L, ...], 5-D); got w13 "
                             f"{self.w13.shape}")
        local = expert_ids - first_expert
        w13, w2 = self.w13[...], self.w2[...]
        readable = (pair_experts.supports_nvfp4(w13, w2) if self.format == "nvfp4" else
                    all(pair_experts.supports(w) for w in (w13, w2)))
        if per_pair and self.format != "bf16" and moe_ops.on_hopper() and readable:   # each pair's expert in place
            mine = (local >= 0) & (local < self.num_local)
            quantised = ((self.w13, self.w13_scale, self.w2, self.w2_scale) if self.format == "fp8" else
                         (self.w13, self.w13_scale, self.w13_scale_2, self.w2, self.w2_scale, self.w2_scale_2))
            in_place = moe_ops.per_pair_experts_fp8 if self.format == "fp8" else moe_ops.per_pair_experts_nvfp4
            return in_place(x, expert_ids, weights, local, mine, *(a[...] for a in quantised), layer).astype(out_dtype)
        if layer is not None and (per_pair or kernel not in moe_ops.STACKED_KERNELS):
            graphdef, state = nnx.split(self)
            return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))(x, expert_ids, weights, first_expert,
                                                                                out_dtype=out_dtype, rounded=rounded)
        if per_pair:
            mine = (local >= 0) & (local < self.num_local)
            w13, w2 = self.weights(jnp.where(mine, local, 0).reshape(-1))
            return moe_ops.per_pair_experts(x, expert_ids, weights, w13, w2, mine).astype(out_dtype)
        if kernel in moe_ops.FP8_KERNELS:                   # reads only the FP8 bytes
            ws_w8a8 = kernel == "mosaic-ws-w8a8"
            hidden, inter = self.w2.shape[-2:]
            block_m = moe_ops.ws_w8a8_block_rows(expert_ids.size, self.num_experts, inter, hidden) if ws_w8a8 else None
            matmuls = moe_ops.fp8_matmuls(self.w13[...], self.w13_scale[...], self.w2[...], self.w2_scale[...],
                                          kernel=kernel, layer=layer, out_dtype=self.dtype, block_m=block_m,
                                          fuse_swiglu=self.fuse_swiglu and ws_w8a8)
        elif kernel == "triton-nvfp4":                     # reads only the NVFP4 bytes
            matmuls = moe_ops.nvfp4_matmuls(self.w13[...], self.w13_scale[...], self.w13_scale_2[...], self.w2[...],
                                            self.w2_scale[...], self.w2_scale_2[...], layer, out_dtype=self.dtype,
                                            block_m=moe_ops.nvfp4_block_rows(expert_ids.size, self.num_experts))
        elif self.format == "bf16":
            w13 = self.w13[...]
            matmuls = moe_ops.weight_matmuls(w13.reshape(*w13.shape[:2], -1), self.w2[...], kernel)
        else:
            w13, w2 = self._dequantized()
            matmuls = moe_ops.weight_matmuls(w13.reshape(w13.shape[0], -1, w13.shape[-1]), w2, kernel,
                                             output_major=True)
        return moe_ops.routed_experts(x, expert_ids, weights, self.num_local, first_expert, matmuls,
                                      local_share=share, out_dtype=out_dtype, prepared=rounded)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs, expert_format: str = "bf16"):
        self.attn_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))
        self.attn = Attention(cfg, dtype, rngs, attention_format(cfg, expert_format))
        self.mlp_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))
        self.router = Router(cfg, rngs)
        self.experts = Experts(cfg, dtype, rngs, expert_format)
        self.eps = cfg.rms_norm_eps

    def __call__(self, r: jax.Array, m: jax.Array, kv: tuple[jax.Array, jax.Array], index: jax.Array,
                 step: StepInput, valid: jax.Array, comm: Comm):
        """One layer's schedule. r: residual of the tokens this device owns; m: the previous
        layer's MoE output for them (not yet added: its reduction fuses with this add + norm);
        valid: validity of the owned tokens (int32, 1 for a real token); index: this layer's, into
        the KV cache and into the experts, which hold every layer's weights (see MiniMaxM2.__call__). Returns (r, m, kv,
        routed-token count per expert with a last bin for "no expert")."""
        r = comm.finish_residual(r, m)
        h = rms_norm(r, self.attn_norm[...], self.eps)
        h = comm.gather_tokens(h)
        o, kv = self.attn(h, kv, index, step, comm)
        r = r + comm.reduce_attention(o).astype(r.dtype)
        h = rms_norm(r, self.mlp_norm[...], self.eps)
        expert_ids, weights = self.router(h, valid, index)
        m = comm.moe(h, expert_ids, weights, self.experts, layer=index).astype(r.dtype)
        counts = jnp.bincount(expert_ids.reshape(-1), length=self.router.weight.shape[-1] + 1)
        return r, m, kv, counts


class MiniMaxM2(nnx.Module):
    """The causal LM: embedding, stacked decoder layers run by a scan, final norm, lm_head."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.bfloat16, expert_format: str = "bf16",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.expert_format = expert_format
        self.embed = _normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype, rngs, expert_format)

        self.layers = make_layers(rngs)
        self.norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))
        self.lm_head = _normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def __call__(self, step: StepInput, kv: tuple[jax.Array, jax.Array],
                 logit_index: jax.Array | None = None, comm: Comm | None = None,
                 targets: jax.Array | None = None, top: int = 0):
        """Runs one step.

        kv: (k, v) caches, each [layers, pages, page_size, kv_heads, head_dim].
        logit_index: [B] index along T of the one token per slot whose logits are wanted; None
        gives logits for every token. Returns (fp32 logits [B, V] or [B, T, V], of this device's
        share of the vocabulary where the LM head is split over tp, new kv, and the routed-token
        counts [layers, experts + 1] of the tokens this device owns).

        targets: [B, T] the token whose log-probability each position scores (the prompt's next
        token; -1 none): a fourth output (`score_targets`) for prompt logprobs, with the `top`
        most likely tokens of each position when top > 0.
        """
        comm = comm or LocalComm()
        b, t = step.tokens.shape
        x = self.embed[...][comm.own_tokens(step.tokens.reshape(-1))]
        # as int32 flags, once: the routing kernel takes them so, and converted in the layer loop
        # they were one more kernel a layer
        valid = comm.own_tokens(step.valid.reshape(-1)).astype(jnp.int32)
        # the experts', the router's and attention's weights stay stacked and each layer is
        # told its index (Experts.__call__, Router, Attention): their kernels read them in place;
        # the rest is sliced by the scan
        graphdef, expert_state, layer_state = nnx.split(self.layers, _held_whole, ...)

        def one_layer(carry, state):
            r, m, kv, index = carry
            layer = nnx.merge(graphdef, expert_state, state)
            r, m, kv, counts = layer(r, m, kv, index, step, valid, comm)
            return (r, m, kv, index + 1), counts

        # the whole cache rides in the carry and each layer updates its slice in place; the
        # layer's index rides there too, a buffer the kernels read as it is (taken from a range
        # it was one more kernel a layer, on GPUs)
        (r, m, kv, _), expert_counts = jax.lax.scan(
            one_layer, (x, jnp.zeros_like(x), tuple(kv), jnp.zeros((), jnp.int32)), layer_state)
        r = comm.finish_residual(r, m)
        h = comm.gather_tokens(rms_norm(r, self.norm[...], self.cfg.rms_norm_eps))
        local_logits = lambda rows: jnp.dot(rows, self.lm_head[...], preferred_element_type=jnp.float32)  # noqa: E731
        logits_of = lambda rows: comm.gather_logits(local_logits(rows))  # noqa: E731
        scored = None if targets is None else score_targets(h, targets.reshape(-1), top, logits_of, (b, t))
        h = h.reshape(b, t, -1)
        if logit_index is not None:
            h = jnp.take_along_axis(h, logit_index[:, None, None], axis=1)[:, 0]
        # this device's part of the vocabulary: sharded_forward decides whether to gather it
        out = (local_logits(h), tuple(kv), expert_counts)
        return out if scored is None else (*out, scored)


PROMPT_SCORE_ROWS = 256      # positions whose full-vocabulary logits exist at once when scoring a prompt


def score_targets(h: jax.Array, targets: jax.Array, top: int, logits_of: Callable[[jax.Array], jax.Array],
                  shape: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of targets under the logits of h's rows (log-softmax over the
    vocabulary, as sampling takes them), PROMPT_SCORE_ROWS rows at a time so a long prefill
    chunk never holds its [tokens, vocabulary] logits whole. h [N, H]; targets [N] (-1: scored as
    token 0, ignored by the caller). Returns (logprobs [*shape], the top ids and logprobs
    [*shape, top])."""
    n = h.shape[0]
    rows = min(n, PROMPT_SCORE_ROWS)
    blocks = -(-n // rows)
    h = jnp.pad(h, ((0, blocks * rows - n), (0, 0))).reshape(blocks, rows, -1)
    targets = jnp.pad(jnp.maximum(targets, 0), (0, blocks * rows - n)).reshape(blocks, rows)

    def block(args):
        rows_h, rows_targets = args
        logprobs = jax.nn.log_softmax(logits_of(rows_h), axis=-1)
        chosen = jnp.take_along_axis(logprobs, rows_targets[:, None], axis=-1)[:, 0]
        if not top:
            return chosen, jnp.zeros((rows, 0), jnp.int32), jnp.zeros((rows, 0), jnp.float32)
        values, ids = jax.lax.top_k(logprobs, top)
        return chosen, ids.astype(jnp.int32), values

    chosen, ids, values = jax.lax.map(block, (h, targets))
    flat = lambda a: a.reshape(blocks * rows, *a.shape[2:])[:n].reshape(*shape, *a.shape[2:])  # noqa: E731
    return flat(chosen), flat(ids), flat(values)


def _held_whole(path: tuple, _) -> bool:
    return "experts" in path or "router" in path or path[-1] in ATTENTION_WEIGHTS + QK_NORMS


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any,
                  kv_heads: int | None = None) -> tuple[jax.Array, jax.Array]:
    shape = (cfg.num_layers, num_pages, page_size, kv_heads or cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
