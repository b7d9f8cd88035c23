"""A few decode rows' queries, keys and values, from the qkv projection's partial sums to the
KV cache, in two Pallas (Triton) kernels.

Between one request's qkv projection and its decode attention, XLA ran eight small kernels a
layer (the projection's K-split sum, the joint qk RMSNorm's sums of squares, the norms and RoPE
of q and k, the query padding, the two cache writes and their bounds check), about 13 us of an
H200's time for work that touches a few KiB (docs/benchmarks.md). Here:

  `sums_of_squares`  one program per (row, KV head) adds the K-split partial sums of its q and
                     k columns and writes their fp32 sums of squares [rows, KV heads, 2]
  (the caller reduces them over the tensor-parallel devices, `Comm.qk_sum_squares`)
  `finish`           one program per (row, KV head) adds the partial sums again, scales q and k
                     by the joint norm and its weights, rotates them (NeoX RoPE on the first
                     rotary_dim dims), writes k and v into the cache in place and q into the
                     rows the decode attention kernel reads (its KV head's query heads padded
                     to 16 rows, `decode_attention.paged_decode_attention(q_padded=True)`)

The numbers are those of `model.Attention`'s XLA path: the projection rounded to the model's
dtype before the norm, the normalised rows rounded before their weights, cos and sin rounded to
the model's dtype; RoPE's products are summed in fp32 and rounded once (XLA may keep them in fp32
too). The qkv columns of each KV head are its query heads, its key and its value, head_dim each
(`model.Attention`'s FP8 layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.ops import triton_common
from minimax_jax.ops.triton_common import whole_block


def supports(head_dim: int, rotary_dim: int, kv_heads: int, cache: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether the kernels take this shape: Triton's vectors are powers of two (half the rotary
    dims, the dims past them, the head dim, the local KV heads) and a cache of 2-4 GiB would be
    written at wrapped offsets (`triton_common.offsets_wrap`)."""
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    p2 = triton_common.power_of_two
    return (rotary_dim % 2 == 0 and p2(half) and (rest == 0 or p2(rest)) and p2(head_dim) and p2(kv_heads)
            and not triton_common.offsets_wrap(cache))


def inverse_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
    """RoPE's inverse frequencies [rotary_dim / 2] in fp32, as `model.rope` computes them."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def sums_of_squares(parts: jax.Array, rows: int, kv_heads: int, group: int, head_dim: int,
                    dtype=jnp.bfloat16, interpret: bool = False) -> jax.Array:
    """parts: [splits, >= rows, kv_heads * (group + 2) * head_dim] fp32 partial sums of the qkv
    projection (`fp8_linear.few_rows(partial_sums=True)`). Returns [rows, kv_heads, 2] fp32: each
    KV head's sum of squares over its query heads' columns and over its key's, of the projection
    rounded to dtype."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    splits, d = parts.shape[0], head_dim

    def kernel(parts_ref, out_ref):
        i, h = pl.program_id(0), pl.program_id(1)
        ss_q = ss_k = jnp.float32(0.0)
        for g in range(group + 1):
            x = _column_sum(parts_ref, splits, i, (h * (group + 2) + g) * d, d, dtype)
            if g < group:
                ss_q += jnp.sum(x * x)
            else:
                ss_k += jnp.sum(x * x)
        out_ref[...] = jnp.where(jnp.arange(2) == 0, ss_q, ss_k)

    return pl.pallas_call(
        kernel, grid=(rows, kv_heads),
        in_specs=[whole_block(parts.shape)],
        out_specs=pl.BlockSpec((None, None, 2), lambda i, h: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, kv_heads, 2), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name="qk_sums_of_squares",
    )(parts)


def finish(parts: jax.Array, sums: jax.Array, q_norm: jax.Array, k_norm: jax.Array, positions: jax.Array,
           slots: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int, *, group: int,
           rotary_dim: int, theta: float, q_size: int, kv_size: int, eps: float, dtype=jnp.bfloat16,
           interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """parts as `sums_of_squares`; sums: its output summed over the devices; q_norm, k_norm: the
    local columns' norm weights, or every layer's [layers, columns] (the layer's are read);
    positions, slots: [rows] int32 (slots: the flat slot within a layer, page * page_size +
    offset; one past the layer's slots or more writes nothing); caches [layers, pages, page_size,
    kv_heads, head_dim]; q_size, kv_size: the whole projection's widths the norms divide by.
    Returns (queries [rows, kv_heads, 16, head_dim] in dtype, each KV head's query heads then zero
    rows; the caches with this step's keys and values written)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    splits = parts.shape[0]
    rows, kv_heads = sums.shape[:2]
    layers, pages, page_size, _, d = k_cache.shape
    slots_per_layer = pages * page_size
    padded = triton_common.DOT_MIN_ROWS
    half, rest = rotary_dim // 2, d - rotary_dim
    stacked_norms = q_norm.ndim == 2

    def kernel(parts_ref, sums_ref, qw_ref, kw_ref, freq_ref, pos_ref, slot_ref, layer_ref, _k_in, _v_in,
               q_ref, k_ref, v_ref):
        i, h = pl.program_id(0), pl.program_id(1)
        totals = sums_ref[...]                               # [kv_heads, 2] of this row
        which = jnp.arange(2)[None, :]
        q_scale = jax.lax.rsqrt(jnp.sum(jnp.where(which == 0, totals, 0.0)) / q_size + eps)
        k_scale = jax.lax.rsqrt(jnp.sum(jnp.where(which == 1, totals, 0.0)) / kv_size + eps)
        angle = pos_ref[0].astype(jnp.float32) * freq_ref[...]
        cos, sin = _rounded(jnp.cos(angle), dtype), _rounded(jnp.sin(angle), dtype)

        def normed_rotated(col, weight_ref, weight_col, scale):
            """The head at column col: summed, normalised, weighted and rotated, as fp32 pieces
            (first half of the rotary dims, second half, the rest)."""
            def piece(offset, size):
                x = _column_sum(parts_ref, splits, i, col + offset, size, dtype)
                cols = pl.ds(weight_col + offset, size)
                w = (weight_ref[layer_ref[0], cols] if stacked_norms else weight_ref[cols]).astype(jnp.float32)
                return _rounded(w * _rounded(x * scale, dtype), dtype)
            lo, hi = piece(0, half), piece(half, half)
            out = [lo * cos - hi * sin, hi * cos + lo * sin]
            return out + ([piece(rotary_dim, rest)] if rest else [])

        def store(ref, index, pieces, out_dtype):
            bounds = [(0, half), (half, half)] + ([(rotary_dim, rest)] if rest else [])
            for value, (offset, size) in zip(pieces, bounds):
                ref[(*index, pl.ds(offset, size))] = value.astype(dtype).astype(out_dtype)

        # every load before the first store: Triton keeps loads behind stores to memory they may share
        head_cols = h * (group + 2) * d
        queries = [normed_rotated(head_cols + g * d, qw_ref, (h * group + g) * d, q_scale) for g in range(group)]
        key = normed_rotated(head_cols + group * d, kw_ref, h * d, k_scale)
        value = _column_sum(parts_ref, splits, i, head_cols + (group + 1) * d, d, dtype)
        slot = slot_ref[0]
        flat = layer_ref[0] * slots_per_layer + slot
        for g, pieces in enumerate(queries):
            store(q_ref, (g,), pieces, q_ref.dtype)
        for g in range(group, padded):
            q_ref[g, :] = jnp.zeros((d,), q_ref.dtype)

        @pl.when((slot >= 0) & (slot < slots_per_layer))
        def _write():
            store(k_ref, (flat, h), key, k_ref.dtype)
            v_ref[flat, h, :] = value.astype(v_ref.dtype)

    flat_shape = (layers * slots_per_layer, kv_heads, d)
    per_row = lambda *shape: pl.BlockSpec((None, *shape), lambda i, h: (i,) + (0,) * len(shape))  # noqa: E731
    queries, k_flat, v_flat = pl.pallas_call(
        kernel, grid=(rows, kv_heads),
        in_specs=[whole_block(parts.shape), per_row(kv_heads, 2), whole_block(q_norm.shape),
                  whole_block(k_norm.shape), whole_block((half,)), per_row(1), per_row(1), whole_block((1,)),
                  whole_block(flat_shape), whole_block(flat_shape)],
        out_specs=[pl.BlockSpec((None, None, padded, d), lambda i, h: (i, h, 0, 0)),
                   whole_block(flat_shape), whole_block(flat_shape)],
        out_shape=[jax.ShapeDtypeStruct((rows, kv_heads, padded, d), dtype),
                   jax.ShapeDtypeStruct(flat_shape, k_cache.dtype), jax.ShapeDtypeStruct(flat_shape, v_cache.dtype)],
        input_output_aliases={8: 1, 9: 2},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name="qk_norm_rope_kv_write",
    )(parts, sums, q_norm, k_norm, jnp.asarray(inverse_frequencies(rotary_dim, theta)),
      positions.astype(jnp.int32).reshape(rows, 1), slots.astype(jnp.int32).reshape(rows, 1),
      jnp.asarray(layer, jnp.int32).reshape(1), k_cache.reshape(flat_shape), v_cache.reshape(flat_shape))
    return queries, k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def _column_sum(parts_ref, splits: int, row, col, size: int, dtype) -> jax.Array:
    """The partial sums of columns [col, col + size) of a row added over the K splits, rounded
    to dtype (as the projection's output is), in fp32."""
    from jax.experimental import pallas as pl
    total = parts_ref[0, row, pl.ds(col, size)]
    for s in range(1, splits):
        total = total + parts_ref[s, row, pl.ds(col, size)]
    return _rounded(total, dtype)


def _rounded(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype).astype(jnp.float32)

