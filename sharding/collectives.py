"""The named communication steps of a decoder layer on the ("dp", "tp") mesh.

`MeshComm` implements `minimax_jax.model.Comm` inside `jax.shard_map`; the layer's own code
(`DecoderLayer.__call__`) is the schedule. Per layer, with N tokens per dp rank:

  ar_fusion on (residual scattered: each device owns N/tp tokens of its rank)
    gather_tokens      all_gather(h, "tp")                    before q/k/v
    qk_sum_squares     psum([N, (KV heads,) 2] fp32, "tp")    joint QK RMSNorm
    reduce_attention   psum_scatter(o, "tp")                  then add + norm on owned tokens
    moe dispatch       all_gather(packed rows, ("dp", "tp"))  hidden (bf16, NVFP4, or the W8A8
                                                              experts' FP8 codes) + ids + weights
    moe combine        psum_scatter(y, ("dp", "tp"))          or psum + slice (all_reduce)
  ar_fusion off (residual replicated over "tp")
    reduce_attention   psum(o, "tp")
    moe dispatch       all_gather(packed rows, "dp")          tokens are already on every tp rank
    moe combine        psum(y, ("dp", "tp")) + slice          or psum_scatter + all_gather("tp")

A step whose tokens do not divide over tp (one decode token on TP4) runs as "ar_fusion off"
(sharding/forward.py), and a combine over fewer rows than devices is a psum + slice.

Every device issues the same collectives whatever its token count: an idle dp rank runs the same
program on padding, so no rank can skip a collective and hang the others.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from minimax_jax.ops import moe as moe_ops
from minimax_jax.ops.moe import PackedTokens
from sharding.mesh import EXPERT_AXES, Layout


def pack_rows(arrays: Sequence[jax.Array]) -> jax.Array:
    """[n, ...] arrays of any dtype as one [n, units] unsigned-integer array (one collective) in
    words of the first array's width: that array is bitcast word for word, so after the
    collective its columns are a plain slice and an elementwise bitcast, which XLA can fuse into
    whatever reads them; the others are split or joined into such words (their rows' bytes must
    be a multiple of the width). Packed as bytes, the hidden states came back through a slice
    and a bitcast to wider words (prefill profiles show a standalone slice kernel of 0.12-0.19 ms
    a layer, docs/benchmarks.md runs BH, BI). Integer words, not the hidden states' float type:
    XLA may compute a float concatenation in another float type, which need not keep other
    arrays' bits."""
    unit = _UINT[jnp.dtype(arrays[0].dtype).itemsize]
    return jnp.concatenate([_as_units(a, unit).reshape(a.shape[0], -1) for a in arrays], axis=1)


def unpack_rows(packed: jax.Array, like: Sequence[jax.ShapeDtypeStruct]) -> list[jax.Array]:
    """Inverse of pack_rows: `like` gives each array's per-row shape and dtype."""
    columns, from_columns = packed_columns(like, packed.dtype)
    return from_columns([packed[:, first:first + width] for first, width in columns])


def packed_columns(like: Sequence[jax.ShapeDtypeStruct], unit, tree=None) -> tuple[tuple[tuple[int, int], ...], Any]:
    """Where pack_rows put the first len(like) arrays in its words of `unit` (each array's
    (first column, width)), and the function that takes those columns back to the arrays (a
    pytree by `tree`, else a list): what `PackedTokens` needs."""
    columns, offset = [], 0
    for spec in like:
        width = math.prod(spec.shape[1:]) * jnp.dtype(spec.dtype).itemsize // jnp.dtype(unit).itemsize
        columns.append((offset, width))
        offset += width

    def from_columns(raw: list[jax.Array]) -> Any:
        arrays = [_from_units(r, spec.dtype, spec.shape[1:]) for r, spec in zip(raw, like)]
        return arrays if tree is None else jax.tree.unflatten(tree, arrays)
    return tuple(columns), from_columns


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _as_units(a: jax.Array, unit) -> jax.Array:
    """a's rows as words of the unsigned type `unit`."""
    size, unit_size = jnp.dtype(a.dtype).itemsize, jnp.dtype(unit).itemsize
    if (math.prod(a.shape[1:]) * size) % unit_size:
        raise ValueError(f"cannot pack {a.dtype} {a.shape} rows into {unit} words")
    if a.dtype == unit:
        return a
    words = jax.lax.bitcast_convert_type(a, _UINT[size])
    if size > unit_size:            # each word split in narrower ones: [..., size / unit_size]
        return jax.lax.bitcast_convert_type(words, unit)
    if size < unit_size:            # narrower words joined: [..., unit_size / size] -> one
        return jax.lax.bitcast_convert_type(words.reshape(a.shape[0], -1, unit_size // size), unit)
    return words


def _from_units(raw: jax.Array, dtype, row_shape: tuple) -> jax.Array:
    """Inverse of _as_units: [n, words] back to [n, *row_shape] of dtype."""
    n, unit_size = raw.shape[0], raw.dtype.itemsize
    size = jnp.dtype(dtype).itemsize
    if size > unit_size:
        raw = jax.lax.bitcast_convert_type(raw.reshape(n, -1, size // unit_size), _UINT[size])
    elif size < unit_size:
        raw = jax.lax.bitcast_convert_type(raw, _UINT[size])
    return jax.lax.bitcast_convert_type(raw, dtype).reshape(n, *row_shape)


class MeshComm:
    """The Comm of one device inside shard_map over the ("dp", "tp") mesh."""

    def __init__(self, layout: Layout, num_kv_heads: int, combine_dtype: Any = jnp.float32):
        self.layout = layout
        self.tp = layout.tp
        self.scatter = layout.ar_fusion and layout.tp > 1
        self.kv_replicas = layout.kv_head_replicas(num_kv_heads)
        self.combine_dtype = combine_dtype

    # -- attention -----------------------------------------------------------------------------

    def own_tokens(self, x: jax.Array) -> jax.Array:
        """The rows of this rank's N tokens that this device owns (N/tp of them when scattered)."""
        if not self.scatter:
            return x
        n = x.shape[0] // self.tp
        return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index("tp") * n, n, axis=0)

    def gather_tokens(self, h: jax.Array) -> jax.Array:
        return jax.lax.all_gather(h, "tp", axis=0, tiled=True) if self.scatter else h

    def qk_sum_squares(self, ss: jax.Array) -> jax.Array:
        if self.tp == 1:
            return ss
        # a KV head copied to r devices would be counted r times
        ss = ss * jnp.array([1.0, 1.0 / self.kv_replicas], jnp.float32)
        return jax.lax.psum(ss, "tp")

    def reduce_attention(self, o: jax.Array) -> jax.Array:
        if self.tp == 1:
            return o
        if self.scatter:
            return jax.lax.psum_scatter(o, "tp", scatter_dimension=0, tiled=True)
        return jax.lax.psum(o, "tp")

    def finish_residual(self, r: jax.Array, m: jax.Array) -> jax.Array:
        return r + m.astype(r.dtype)

    def gather_logits(self, logits: jax.Array) -> jax.Array:
        return jax.lax.all_gather(logits, "tp", axis=logits.ndim - 1, tiled=True) if self.tp > 1 else logits

    # -- MoE -----------------------------------------------------------------------------------

    def moe(self, h: jax.Array, expert_ids: jax.Array, weights: jax.Array, experts,
            layer: jax.Array | None = None) -> jax.Array:
        pairs = expert_ids.size * math.prod(getattr(self.layout, a) for a in self._dispatch_axes())
        rounding = experts.token_rounding(pairs) if self.layout.fp8_dispatch or self.layout.fp4_dispatch else None
        x, ids, w = self.dispatch(h, expert_ids, weights, rounding)
        if self.layout.moe == "ep":
            local = experts.num_local
            first = jax.lax.axis_index(EXPERT_AXES) * local
        else:
            first = 0
        y = experts(x, ids, w, first_expert=first, layer=layer, out_dtype=self.combine_dtype,
                    rounded=not isinstance(x, jax.Array))     # a dispatch with no gather rounds nothing
        return self.combine(y, h.shape[0])

    def _dispatch_axes(self) -> tuple[str, ...]:
        axes = EXPERT_AXES if self.scatter else ("dp",)
        return tuple(a for a in axes if getattr(self.layout, a) > 1)

    def dispatch(self, h: jax.Array, expert_ids: jax.Array, weights: jax.Array,
                 rounding: Callable[[jax.Array], Any] | None = None) -> tuple[Any, jax.Array, jax.Array]:
        """One all-gather of every token's hidden state with its routing: bf16, NVFP4 (given
        back dequantised, or for W8A8 experts, whose `rounding` is given, as their FP8 codes and
        scales of the dequantised values), or as `rounding` makes it (the W8A8 experts' FP8 codes
        and scales, given back still packed: the experts round each token the same wherever it
        is rounded)."""
        axes = self._dispatch_axes()
        if not axes:
            return h, expert_ids, weights
        if self.layout.fp4_dispatch:
            hidden = list(moe_ops.nvfp4_dispatch_payload(h))
        elif rounding is not None:
            hidden, tree = jax.tree.flatten(rounding(h))
        else:
            hidden = [h]
        rows = hidden + [expert_ids, weights]
        like = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rows]
        gathered = jax.lax.all_gather(pack_rows(rows), axes, axis=0, tiled=True)
        *hidden, expert_ids, weights = unpack_rows(gathered, like)
        if self.layout.fp4_dispatch:
            return moe_ops.nvfp4_dispatch_tokens(*hidden, h, rounding is not None), expert_ids, weights
        if rounding is not None:      # unpacked row by row as the experts gather them
            columns, from_columns = packed_columns(like[:len(hidden)], gathered.dtype, tree)
            return PackedTokens(gathered, columns, from_columns), expert_ids, weights
        return hidden[0], expert_ids, weights

    def combine(self, y: jax.Array, n_local: int) -> jax.Array:
        """Sums every device's partial expert outputs for the tokens this device holds."""
        everyone = tuple(a for a in EXPERT_AXES if getattr(self.layout, a) > 1)
        if not everyone:
            return y
        devices = math.prod(getattr(self.layout, a) for a in everyone)
        if self.layout.combine == "reduce_scatter" and y.shape[0] % devices == 0:   # else: fewer rows than devices
            part = jax.lax.psum_scatter(y, everyone, scatter_dimension=0, tiled=True)
            return part if self.scatter or self.tp == 1 else jax.lax.all_gather(part, "tp", axis=0, tiled=True)
        full = jax.lax.psum(y, everyone)
        owner = jax.lax.axis_index(everyone) if self.scatter else jax.lax.axis_index("dp") if self.layout.dp > 1 else 0
        return jax.lax.dynamic_slice_in_dim(full, owner * n_local, n_local, axis=0)
