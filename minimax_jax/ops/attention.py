"""Attention over a paged KV cache.

The cache holds every layer ([layers, pages, ...]) and is updated in place at the layer's index:
passing one layer's slice through the layer scan copied the whole cache every step. The
reference gathers each sequence's pages into a contiguous [S, kv_heads, head_dim] view and runs
masked softmax attention in fp32. It serves prefill chunks (T > 1) and decode (T == 1) alike: a
query at position p sees exactly the keys at positions 0..p of its own sequence, which are all in
the cache because a step writes its keys before it attends.

`paged_attention` picks the implementation: the reference, or for prefill chunks on GPUs cuDNN's
flash attention (jax.nn.dot_product_attention) over the same gathered pages, with the visibility
mask passed as a mask, so a chunk that continues an earlier one (its queries start past 0) is
exact too; cuDNN's own causal mask aligns queries to key 0 and would not be. Decode steps (one
query per slot) take the reference or a Pallas kernel that reads the pages in place
(`ops.decode_attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimax_jax.ops import decode_attention


def write_kv(cache: jax.Array, new: jax.Array, slots: jax.Array, layer: jax.Array) -> jax.Array:
    """Writes new[n] into flat slot slots[n] of one layer of the cache, in place; a slot out of
    range (padding) writes nothing.

    cache: [layers, pages, page_size, kv_heads, head_dim]; new: [N, kv_heads, head_dim]; slots: [N].
    """
    layers, pages, page_size = cache.shape[:3]
    flat = cache.reshape(layers, pages * page_size, *cache.shape[3:])
    # unique: valid tokens own distinct slots and padding's shared slot is dropped. Without the
    # promise XLA writes each element with an atomic, a compare-and-swap loop for 1-byte FP8
    flat = flat.at[layer, slots].set(new.astype(cache.dtype), mode="drop", unique_indices=True)
    return flat.reshape(cache.shape)


def kv_slots(positions: jax.Array, valid: jax.Array, page_table: jax.Array, page_size: int,
             num_pages: int) -> jax.Array:
    """Flat cache slot of each token [B, T]; padding tokens get an out-of-range slot."""
    page = jnp.take_along_axis(page_table, positions // page_size, axis=1, mode="clip")
    slots = page * page_size + positions % page_size
    return jnp.where(valid, slots, num_pages * page_size)


BACKENDS = ("auto", "xla", "cudnn")
DECODE_BACKENDS = ("auto", "xla", "pallas")


def resolve_backend(backend: str, dtype=jnp.bfloat16) -> str:
    """"xla" (the reference), "cudnn" (flash attention for prefill chunks, the reference for
    decode), or "auto": "cudnn" on GPUs for 16-bit models (cuDNN's flash attention takes no
    float32), "xla" otherwise. On an H200, at the engine's prefill shapes (4 slots of 1024
    queries, FP8 cache), cuDNN took 0.61 ms against 2.11 ms with an error against an fp32
    reference of 2.0e-3 against the reference's 2.3e-3 (docs/benchmarks.md, `scripts/bench.py
    --sections attention`)."""
    return _resolve("attention backend", backend, BACKENDS, "cudnn", dtype)


def resolve_decode_backend(backend: str, dtype=jnp.bfloat16) -> str:
    """"xla" (the reference) or "pallas" (`ops.decode_attention`: a Triton kernel on GPUs, its
    interpreter elsewhere); "auto" is "pallas" on GPUs for 16-bit models (a float32 model keeps
    the reference's full-precision products) and "xla" otherwise."""
    return _resolve("decode attention backend", backend, DECODE_BACKENDS, "pallas", dtype)


def _resolve(what: str, backend: str, choices: tuple[str, ...], kernel: str, dtype) -> str:
    """backend checked against choices; "auto" is kernel on GPUs for 16-bit models, else "xla"."""
    if backend not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {backend!r}")
    if backend != "auto":
        return backend
    return kernel if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, page_table: jax.Array,
                    positions: jax.Array, layer: jax.Array, backend: str = "xla",
                    decode_backend: str = "xla", chunk_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """As `paged_attention_reference`. backend (prefill chunks, T > 1): "cudnn" runs them through
    jax.nn.dot_product_attention, cuDNN's flash attention on GPUs and the same call's XLA
    implementation elsewhere (which is how CPU tests check the masks and head grouping);
    decode_backend (T == 1): "pallas" runs `decode_attention.paged_decode_attention` (a cache it
    cannot read, `decode_attention.supports`, takes the reference).

    chunk_kv: the chunk's own keys and values [B, T, kv_heads, D], given when every sequence
    starts in this chunk (`StepInput.fresh`): "cudnn" then attends over them with its causal
    mask instead of gathering the pages back (in the cache's dtype) under a dense mask, as
    sglang's ragged prefill does for new tokens."""
    if q.shape[1] == 1:
        if decode_backend == "pallas" and decode_attention.supports(k_cache):
            return decode_attention.paged_decode_attention(q, k_cache, v_cache, page_table, positions, layer,
                                                           interpret=jax.default_backend() != "gpu")
        return paged_attention_reference(q, k_cache, v_cache, page_table, positions, layer)
    if backend == "xla":
        return paged_attention_reference(q, k_cache, v_cache, page_table, positions, layer)
    flash = functools.partial(jax.nn.dot_product_attention,
                              implementation="cudnn" if jax.default_backend() == "gpu" else "xla")
    if chunk_kv is not None:
        return flash(q, *chunk_kv, is_causal=True)
    keys, values = gather_pages(k_cache, v_cache, page_table, layer, q.dtype)
    return flash(q, keys, values, mask=_visible(positions, keys.shape[1])[:, None])


def gather_pages(k_cache: jax.Array, v_cache: jax.Array, page_table: jax.Array, layer: jax.Array,
                  dtype) -> tuple[jax.Array, jax.Array]:
    """[B, S, kv_heads, D] keys and values of each sequence's pages, in `dtype` (an FP8 cache,
    unit scale, widens here)."""
    b = page_table.shape[0]
    hk, d = k_cache.shape[3:]
    keys = k_cache[layer, page_table].reshape(b, -1, hk, d).astype(dtype)
    values = v_cache[layer, page_table].reshape(b, -1, hk, d).astype(dtype)
    return keys, values


def _visible(positions: jax.Array, num_keys: int) -> jax.Array:
    """[B, T, S]: a query at position p sees keys 0..p."""
    return jnp.arange(num_keys)[None, None, :] <= positions[:, :, None]


def paged_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                              page_table: jax.Array, positions: jax.Array, layer: jax.Array) -> jax.Array:
    """q: [B, T, q_heads, D]; caches: [layers, pages, page_size, kv_heads, D]; page_table: [B, P];
    positions: [B, T]. Returns [B, T, q_heads, D] in q's dtype."""
    b, t, hq, d = q.shape
    hk = k_cache.shape[3]
    keys, values = gather_pages(k_cache, v_cache, page_table, layer, q.dtype)   # only these pages
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, keys, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    visible = _visible(positions, keys.shape[1])
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
