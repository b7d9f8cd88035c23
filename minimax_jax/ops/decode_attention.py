"""Decode attention over the paged KV cache as one Pallas (Triton) kernel on GPUs.

The reference (`attention.paged_attention_reference`) gathers every slot's pages into a
contiguous copy, transposes it for the two einsums and materialises the scores: at a DEP4 decode
step of 303 slots with 960-token contexts that was about 0.75 ms per layer on an H200, against
0.12 ms to read the FP8 keys and values once. Here one program per (slot, KV head) walks the
slot's pages in place (the cache's layer and page are folded into one index, so no layer slice
is copied), widens FP8 entries in registers and keeps an online softmax, so keys and values are
read once and nothing else touches memory. A block is one page, loaded by a scalar page index:
Triton's pipeliner then keeps the next 4 blocks' loads in flight (5 stages) while a block is
computed, which it did not do for a block loaded by a vector of page indices (the kernel used to
load the next block into registers itself, which held 233 registers a thread and two programs an
SM). At W1's DEP4 decode shape on an H200 that took the kernel from 332-340 to 215-227 us a
layer with 2 warps a program, about the time of its loads alone (docs/benchmarks.md, runs DB-DE).
When the (slot, KV head) programs are too few to occupy the GPU (one request on TP4 is two), each
context is split over several programs whose partial softmax sums are combined afterwards
(flash-decoding).

The softmax's running sums are kept per row and key column and summed across the columns once,
after the last block (per block that sum crossed the warps), and only the last block masks keys
past the context: 342 -> 331 and 347 -> 337 us a layer at W1's DEP4 decode shape on an H200
(docs/benchmarks.md, runs CN and CS). Query heads that share a KV head (6 for MiniMax-M2) are
padded to the 16 rows a Triton dot needs. An FP8 cache is widened to fp16, not bf16, and the
probabilities enter the PV product in that dtype too (the reference rounds them to the value
dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimax_jax.ops import triton_common

MIN_ROWS = triton_common.DOT_MIN_ROWS
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = 1.4426950408889634


def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, page_table: jax.Array,
                           positions: jax.Array, layer: jax.Array, *, block_keys: int = 64,
                           num_warps: int = 2, num_stages: int = 5, prefetch: bool = False,
                           splits: int | None = None, compute_dtype=None, fast_exp: bool = True,
                           scalar_page: bool = True, group: int | None = None,
                           interpret: bool = False) -> jax.Array:
    """q: [B, 1, q_heads, D]; caches: [layers, pages, page_size, kv_heads, D]; page_table: [B, P];
    positions: [B, 1] (the token at position p sees keys 0..p). Returns [B, 1, q_heads, D] in
    q's dtype, as `attention.paged_attention_reference`. Keys are taken block_keys at a time
    (whole pages); page_size and D must be powers of two (`supports`). num_stages: the blocks
    Triton's pipeliner keeps in flight (2-4 took 240-257 us a layer at W1's decode shape, 5-8
    took 223-227, run DE); scalar_page: a one-page block is loaded by a scalar page index, which
    the pipeliner overlaps (a vector index of one page took 357 against 246 us, run DC). prefetch:
    the kernel loads each next block into registers itself before the block's arithmetic (the
    default until 2026-11-29, with 4 warps and 2 stages: 332-340 us, runs DA-DE).

    splits: programs per (slot, KV head), each over its share of the context, their partial
    softmax sums combined after the kernel; None picks enough to give every SM two programs
    (`context_splits`): one request on TP4 is 2 programs otherwise, each walking its 1000 keys
    alone while the other SMs idle. The splits are rounded up to a power of two (one past the
    context weighs nothing) and combined by a second kernel (`_combine`): as XLA's three fusions
    it was two more kernels a layer.

    group: q is already the kernel's rows, [B, kv_heads, 16, D], each KV head's `group` query
    heads then zero rows (`attention_inputs.finish` writes them so).

    compute_dtype: what keys, values, queries and probabilities enter the dots as; None: fp16
    for an 8-bit cache (e4m3 widens to fp16 exactly in one instruction per pair, and fp16 holds
    queries and probabilities with more mantissa than bf16), else q's dtype. fast_exp: the
    softmax in base 2 by the GPU's ex2 instruction instead of libdevice's expf. Together they
    took the kernel from 373 to 340 us a layer at W1's decode shape on an H200
    (docs/benchmarks.md)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    layers, pages, page_size, hk, d = k_cache.shape
    if group is None:
        b, t, hq, _ = q.shape
        group = hq // hk
        if t != 1:
            raise ValueError(f"decode attention takes one query per slot, got {t}")
    else:
        b, hq = q.shape[0], hk * group
        if q.shape[1:] != (hk, MIN_ROWS, d) or group > MIN_ROWS:
            raise ValueError(f"padded queries must be [B, {hk}, {MIN_ROWS}, {d}] holding at most {MIN_ROWS} "
                             f"heads each, got {q.shape} for {group}")
    if not supports(k_cache):
        raise ValueError(f"decode attention kernel needs a power-of-two page size and head dim, and an 8-bit cache "
                         f"of at most 2**31 entries or over 4 GiB, got {k_cache.shape} {k_cache.dtype}")
    pages_per_block = max(1, block_keys // page_size)
    if pages_per_block * page_size < MIN_ROWS:     # Triton's dots; the GPU summed padding (twice the answer)
        raise ValueError(f"decode attention kernel needs blocks of at least {MIN_ROWS} keys, got block_keys "
                         f"{block_keys} over pages of {page_size}")
    rows = max(MIN_ROWS, triton_common.next_power_of_two(group))
    qg = q if q.shape[1:] == (hk, rows, d) else jnp.pad(q.reshape(b, hk, group, d),
                                                        ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    # one flat page index over (layer, page): the kernel reads this layer's pages in place
    blocks = -(-page_table.shape[1] // pages_per_block)
    per_slot = blocks * pages_per_block
    # (the kernel adds the layer's offset and clips the lengths: as XLA fusions they were two
    # more kernels a layer)
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, per_slot - page_table.shape[1])))
    k_flat = k_cache.reshape(layers * pages, page_size, hk, d)
    v_flat = v_cache.reshape(layers * pages, page_size, hk, d)
    splits = min(splits or context_splits(b * hk), blocks)
    blocks_per_split = -(-blocks // splits)
    splits = -(-blocks // blocks_per_split)          # none left empty by the rounding
    if splits > 1:      # a power of two for the combine's vectors; the rest attend nothing
        splits = triton_common.next_power_of_two(splits)

    if compute_dtype is None:   # FP8 entries widen to fp16 exactly, in one instruction per pair
        compute_dtype = jnp.float16 if jnp.dtype(k_cache.dtype).itemsize == 1 else q.dtype
    exp = ("exp2" if interpret else "ex2.approx") if fast_exp else "exp"
    kernel = functools.partial(_kernel, pages_per_block=pages_per_block, page_size=page_size, num_pages=pages,
                               max_length=per_slot * page_size, scale=d ** -0.5,
                               prefetch=prefetch, compute_dtype=jnp.dtype(compute_dtype), exp=exp,
                               scalar_page=scalar_page and pages_per_block == 1,
                               blocks_per_split=blocks_per_split if splits > 1 else None)
    cache_spec = pl.BlockSpec((layers * pages, page_size, None, d), lambda i, h, s: (0, 0, h, 0))
    parts = lambda *shape: pl.BlockSpec((None, None, None, *shape), lambda i, h, s: (i, h, s) + (0,) * len(shape))  # noqa: E731
    if splits == 1:
        out_specs = pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0))
        out_shape = jax.ShapeDtypeStruct(qg.shape, qg.dtype)
    else:       # unnormalised output, running max and sum of each split
        out_specs = [parts(rows, d), parts(rows), parts(rows)]
        out_shape = [jax.ShapeDtypeStruct((b, hk, splits, rows, d), jnp.float32),
                     *[jax.ShapeDtypeStruct((b, hk, splits, rows), jnp.float32)] * 2]
    out = pl.pallas_call(
        kernel,
        grid=(b, hk, splits),
        in_specs=[pl.BlockSpec((1,), lambda i, h, s: (0,)),
                  pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0)),
                  cache_spec, cache_spec,
                  pl.BlockSpec((None, per_slot), lambda i, h, s: (i, 0)),
                  pl.BlockSpec((None, 1), lambda i, h, s: (i, 0))],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), qg, k_flat, v_flat, table, positions[:, :1].astype(jnp.int32))
    if splits > 1:
        return _combine(*out, group, qg.dtype, interpret).reshape(b, 1, hq, d)
    return out[:, :, :group].reshape(b, 1, hq, d)


def _combine(o: jax.Array, m: jax.Array, l: jax.Array, group: int, dtype, interpret: bool) -> jax.Array:
    """The context splits' partial softmax sums combined, one program per (slot, query head):
    o [B, kv_heads, splits, rows, D] unnormalised outputs, m and l [B, kv_heads, splits, rows]
    running maxima (base e) and sums. Returns [B, kv_heads * group, D] in dtype."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    b, hk, splits, _, d = o.shape

    def kernel(o_ref, m_ref, l_ref, out_ref):
        m = m_ref[...]
        weight = jnp.exp(m - jnp.max(m))                  # a split with no keys weighs 0
        total = jnp.sum(o_ref[...] * weight[:, None], axis=0)
        out_ref[...] = (total / jnp.sum(l_ref[...] * weight)).astype(out_ref.dtype)

    stat = pl.BlockSpec((None, None, splits, None), lambda i, h, g: (i, h, 0, g))
    return pl.pallas_call(
        kernel, grid=(b, hk, group),
        in_specs=[pl.BlockSpec((None, None, splits, None, d), lambda i, h, g: (i, h, 0, g, 0)), stat, stat],
        out_specs=pl.BlockSpec((None, None, d), lambda i, h, g: (i, h * group + g, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hk * group, d), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name="decode_attention_combine",
    )(o, m, l)


def context_splits(programs: int) -> int:
    """Splits of each context that give the SMs of the device two programs each (1 when the
    (slot, KV head) programs do already)."""
    from minimax_jax.ops.mosaic_common import sm_count
    return max(1, -(-2 * sm_count() // programs))


def supports(cache: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether the kernel reads this cache [layers, pages, page_size, kv_heads, D] correctly:
    Triton's blocks are powers of two (a block of whole pages, the head dim), and an FP8 cache of
    2-4 GiB would be read at wrapped offsets (`triton_common.offsets_wrap`)."""
    page_size, head_dim = cache.shape[2], cache.shape[4]
    return (triton_common.power_of_two(page_size) and triton_common.power_of_two(head_dim) and head_dim >= MIN_ROWS
            and not triton_common.offsets_wrap(cache))


def _kernel(layer_ref, q_ref, k_ref, v_ref, pages_ref, position_ref, *out_refs, pages_per_block, page_size,
            num_pages, max_length, scale, prefetch=False, blocks_per_split=None, compute_dtype=jnp.bfloat16,
            exp="exp", scalar_page=False):
    """One (slot, KV head), over all its blocks of keys, or with blocks_per_split over the
    program's share of them, writing its unnormalised output and softmax statistics. The cache's
    page i of this layer is flat page layer * num_pages + i. exp: "exp" (libdevice),
    "ex2.approx" (one instruction), or "exp2" (its stand-in under the interpreter, which cannot
    run inline PTX)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    q = q_ref[...].astype(compute_dtype)
    rows, d = q.shape
    if exp == "exp":
        power, score_scale = jnp.exp, scale
    else:           # softmax in base 2: the scores scaled by log2(e), one ex2 per probability
        power, score_scale = (jnp.exp2 if exp == "exp2" else _ex2_approx), scale * LOG2E
    block_k = pages_per_block * page_size
    length = jnp.minimum(position_ref[0] + 1, max_length)
    layer_first_page = layer_ref[0] * num_pages
    num_blocks = pl.cdiv(length, block_k)
    first, end = 0, num_blocks
    if blocks_per_split is not None:
        first = pl.program_id(2) * blocks_per_split
        end = jnp.minimum(first + blocks_per_split, num_blocks)

    def load(i):
        if scalar_page:
            page = layer_first_page + jnp.clip(pages_ref[i], 0, num_pages - 1)
            return k_ref[page], v_ref[page]
        pages = layer_first_page + jnp.clip(pages_ref[pl.ds(i * pages_per_block, pages_per_block)], 0, num_pages - 1)
        return k_ref[pages], v_ref[pages]

    def attend(i, k, v, o, m, l, last=False):
        # l: the softmax's sums per row and key column, summed over the columns once at the end
        # (a sum across the warps per block otherwise); only the last block masks keys
        k = k.reshape(block_k, d).astype(compute_dtype)
        v = v.reshape(block_k, d).astype(compute_dtype)
        s = pltriton.dot(q, k.T).astype(jnp.float32) * score_scale
        if last:
            visible = i * block_k + jnp.arange(block_k) < length
            s = jnp.where(visible[None, :], s, MASKED)
        m_next = jnp.maximum(m, s.max(axis=-1))
        correction = power(m - m_next)
        p = power(s - m_next[:, None])
        l = l * correction[:, None] + p
        o = o * correction[:, None] + pltriton.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return o, m_next, l

    def block(i, carry):
        return attend(i, *load(i), *carry)

    def prefetched_block(i, carry):
        # the next block's loads are issued before this block's arithmetic, so they are in flight
        # while it runs
        k, v, *state = carry
        following = load(i + 1)
        return (*following, *attend(i, k, v, *state))

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
            jnp.zeros((rows, block_k), jnp.float32))
    # every block but the last in the loop, the last after it, masked: a split past the context
    # attends one block whose keys are all masked, which weighs nothing in the combine
    last = jnp.maximum(end - 1, first)
    in_context = lambda i: jnp.clip(i, 0, jnp.maximum(num_blocks - 1, 0))  # noqa: E731 - a block to load
    if prefetch:
        k, v, *state = jax.lax.fori_loop(first, last, prefetched_block, (*load(in_context(first)), *init))
    else:
        state = jax.lax.fori_loop(first, last, block, init)
        k, v = load(in_context(last))
    o, m, l = attend(last, k, v, *state, last=True)
    l = l.sum(axis=-1)
    if blocks_per_split is None:
        out_refs[0][...] = (o / l[:, None]).astype(out_refs[0].dtype)
    else:           # the combine works in base e
        o_ref, m_ref, l_ref = out_refs
        o_ref[...], m_ref[...], l_ref[...] = o, m if exp == "exp" else m / LOG2E, l


def _ex2_approx(x: jax.Array) -> jax.Array:
    """2**x by the GPU's special-function unit (one instruction; subnormal results flush to 0,
    which only ever meets probabilities below 2**-126)."""
    from jax.experimental.pallas import triton as pltriton
    return pltriton.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]
