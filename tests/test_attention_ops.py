"""Prefill attention through jax.nn.dot_product_attention (cuDNN's flash attention on GPUs; its
XLA implementation here) equals the reference over paged caches, including chunks that continue
an earlier chunk, grouped heads, padding rows and an FP8 cache. The Pallas decode kernel runs
under Pallas's interpreter here; on a GPU, `JAX_PLATFORMS=cuda MINIMAX_JAX_KERNEL_TESTS=gpu pytest
tests/test_attention_ops.py` compiles it with Triton instead."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.ops import attention, decode_attention

INTERPRET = os.environ.get("MINIMAX_JAX_KERNEL_TESTS") != "gpu"


def paged_case(cache_dtype, seed=0):
    rng = np.random.RandomState(seed)
    layers, pages, page_size, hk, g, d = 2, 12, 4, 2, 3, 16
    k = jnp.asarray(rng.standard_normal((layers, pages, page_size, hk, d)), jnp.float32).astype(cache_dtype)
    v = jnp.asarray(rng.standard_normal((layers, pages, page_size, hk, d)), jnp.float32).astype(cache_dtype)
    table = jnp.asarray(rng.permutation(pages)[:9].reshape(3, 3), jnp.int32)   # 3 sequences of 3 pages
    # sequence 0: first chunk at 0; sequence 1: a chunk continuing at position 5; sequence 2: a
    # 2-token chunk at 9 padded to 4 (padding rows repeat the last position)
    positions = jnp.asarray([[0, 1, 2, 3], [5, 6, 7, 8], [9, 10, 10, 10]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, 4, hk * g, d)), jnp.bfloat16)
    return q, k, v, table, positions


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_flash_prefill_equals_the_reference_on_continued_chunks(cache_dtype):
    q, k, v, table, positions = paged_case(cache_dtype)
    for layer in (0, 1):
        ref = attention.paged_attention_reference(q, k, v, table, positions, jnp.int32(layer))
        flash = attention.paged_attention(q, k, v, table, positions, jnp.int32(layer), "cudnn")
        np.testing.assert_allclose(np.asarray(flash, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    # the continued chunk must see its earlier keys: masking them out changes the answer
    ref = attention.paged_attention_reference(q, k, v, table, positions, jnp.int32(0))
    first_only = attention.paged_attention(q, k, v, table, positions - positions[:, :1], jnp.int32(0), "cudnn")
    assert not np.allclose(np.asarray(first_only[1], np.float32), np.asarray(ref[1], np.float32), atol=2e-2)


def test_fresh_chunks_attend_over_their_own_keys_as_over_the_pages_they_wrote():
    """Chunks that start their sequences (valid tokens first, padding after): attention over
    the chunk's own keys with the causal mask equals the paged path once the keys are written
    (given an unwritten cache, so it must read the chunk's keys)."""
    rng = np.random.RandomState(3)
    b, t, hk, g, d, page_size = 3, 8, 2, 3, 16, 4
    lengths = [8, 5, 1]
    q = jnp.asarray(rng.standard_normal((b, t, hk * g, d)), jnp.bfloat16)
    k_new = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.bfloat16)
    valid = np.arange(t)[None] < np.asarray(lengths)[:, None]
    positions = jnp.asarray(np.where(valid, np.arange(t)[None], 0), jnp.int32)
    table = jnp.asarray(rng.permutation(8)[:6].reshape(b, 2), jnp.int32)
    k_cache, v_cache = empty = tuple(jnp.zeros((1, 8, page_size, hk, d), jnp.bfloat16) for _ in range(2))
    slots = attention.kv_slots(positions, jnp.asarray(valid), table, page_size, 8).reshape(-1)
    k_cache = attention.write_kv(k_cache, k_new.reshape(b * t, hk, d), slots, jnp.int32(0))
    v_cache = attention.write_kv(v_cache, v_new.reshape(b * t, hk, d), slots, jnp.int32(0))
    paged = attention.paged_attention(q, k_cache, v_cache, table, positions, jnp.int32(0), "cudnn")
    fresh = attention.paged_attention(q, *empty, table, positions, jnp.int32(0), "cudnn", chunk_kv=(k_new, v_new))
    np.testing.assert_allclose(np.asarray(fresh, np.float32)[valid], np.asarray(paged, np.float32)[valid], atol=2e-2)
    assert not np.allclose(np.asarray(fresh, np.float32)[valid], 0)


def test_decode_uses_the_reference_and_backends_resolve(monkeypatch):
    q, k, v, table, positions = paged_case(jnp.bfloat16)
    one = q[:, :1]
    np.testing.assert_array_equal(
        np.asarray(attention.paged_attention(one, k, v, table, positions[:, :1], jnp.int32(0), "cudnn")),
        np.asarray(attention.paged_attention_reference(one, k, v, table, positions[:, :1], jnp.int32(0))))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")   # this file also runs on GPUs
    assert attention.resolve_backend("auto") == "xla"           # "cudnn" on GPUs
    with pytest.raises(ValueError, match="must be one of"):
        attention.resolve_backend("flashinfer")


@pytest.mark.parametrize("page_size", [8, 16])
@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_decode_kernel_equals_the_reference_in_each_layer_context_and_split(cache_dtype, page_size):
    """Contexts of one key, one that ends inside a block of pages, one that ends on a block's
    boundary, and one as long as the pages handed out before the table's padding (pages of 8);
    the kernel runs under Pallas's interpreter here."""
    rng = np.random.RandomState(1)
    layers, pages, hk, g, d = 2, 24, 2, 6, 16
    k, v = (jnp.asarray(rng.standard_normal((layers, pages, page_size, hk, d)), jnp.float32).astype(cache_dtype)
            for _ in range(2))
    table = jnp.asarray(rng.permutation(pages)[:20].reshape(4, 5), jnp.int32)
    positions = jnp.asarray([[0], [20], [31], [39]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((4, 1, hk * g, d)), jnp.bfloat16)
    if page_size == 8:      # blocks of two pages and of four: a vector of page indices
        forms = [dict(block_keys=16, splits=n) for n in (1, 2, 3)] + [dict(block_keys=32, splits=3, prefetch=True)]
    else:   # blocks of one page (a scalar index, the engine's default at pages of 64), each loaded in its
        # iteration or, with prefetch, during the block before; the whole context per program, or split
        # in 2 or 3 and combined (the first slot's later splits hold no key)
        forms = [dict(block_keys=16, splits=n, prefetch=prefetch) for n in (1, 3) for prefetch in (False, True)]
        forms += [dict(block_keys=16, splits=1, scalar_page=False), dict(block_keys=32, splits=2)]
    # every form on the second layer (a nonzero layer offset); the first layer by one form
    ref = attention.paged_attention_reference(q, k, v, table, positions, jnp.int32(1))
    for form in forms:
        out = decode_attention.paged_decode_attention(q, k, v, table, positions, jnp.int32(1),
                                                      interpret=INTERPRET, **form)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2,
                                   err_msg=str(form))
    # libdevice's exp in base e and the cache's own dtype in the dots, not the defaults
    out = decode_attention.paged_decode_attention(q, k, v, table, positions, jnp.int32(1), block_keys=16,
                                                  splits=2, compute_dtype=jnp.bfloat16, fast_exp=False,
                                                  interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    # the other layer's keys give the other layer's answer: the layer offset is read
    first = decode_attention.paged_decode_attention(q, k, v, table, positions, jnp.int32(0), block_keys=16,
                                                    interpret=INTERPRET)
    first_ref = attention.paged_attention_reference(q, k, v, table, positions, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(first, np.float32), np.asarray(first_ref, np.float32), atol=2e-2)
    assert not np.allclose(np.asarray(first, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_decode_kernel_refuses_blocks_smaller_than_a_triton_dot():
    """A block of 8 keys gave twice the answer on an H200 (run DR): Triton's dots need 16."""
    k = jnp.zeros((1, 4, 8, 1, 16), jnp.bfloat16)
    q = jnp.zeros((1, 1, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="at least 16 keys"):
        decode_attention.paged_decode_attention(q, k, k, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                                jnp.int32(0), block_keys=8, interpret=True)


def test_decode_backend_resolves_to_the_reference_off_gpus(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")   # this file also runs on GPUs
    assert attention.resolve_decode_backend("auto") == "xla"    # "pallas" on GPUs
    with pytest.raises(ValueError, match="must be one of"):
        attention.resolve_decode_backend("flashinfer")


def test_contexts_are_split_only_when_slots_leave_sms_idle(monkeypatch):
    from minimax_jax.ops import mosaic_common
    monkeypatch.setattr(mosaic_common, "sm_count", lambda: 132)
    assert decode_attention.context_splits(303 * 8) == 1          # a DEP4 rank of W1: 2424 programs
    assert decode_attention.context_splits(1 * 2) == 132          # one request on TP4 (capped by its blocks)
    assert decode_attention.context_splits(64 * 2) == 3


@pytest.mark.parametrize("page_size,cache_dtype,slots", [(64, jnp.float8_e4m3fn, 303), (16, jnp.bfloat16, 303),
                                                         (64, jnp.float8_e4m3fn, 1)])
def test_decode_kernel_lowers_to_triton_for_gpus_at_full_size(page_size, cache_dtype, slots):
    """Pallas's Triton lowering runs here for the CUDA platform (a DEP4 rank's decode step:
    303 slots of 1024 tokens, 62 layers; the benchmarks' FP8 cache of 64-token pages and the
    engine's default bf16 cache of 16; and one slot, whose context is split over programs); the
    GPU's compile is left to the device benchmarks."""
    args = (jax.ShapeDtypeStruct((slots, 1, 48, 128), jnp.bfloat16),
            *[jax.ShapeDtypeStruct((62, 4096, page_size, 8, 128), cache_dtype)] * 2,
            jax.ShapeDtypeStruct((slots, 1024 // page_size), jnp.int32), jax.ShapeDtypeStruct((slots, 1), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))
    text = jax.jit(decode_attention.paged_decode_attention).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text


def test_decode_kernel_refuses_caches_whose_offsets_would_wrap_and_attention_falls_back():
    """Pallas's Triton lowering offsets arrays of up to 4 GiB in signed 32 bits: an FP8 cache of
    2-4 GiB would be read at wrapped addresses, so the kernel refuses it (paged_attention then
    takes the reference); a bf16 cache of as many entries is over 4 GiB and offset in 64 bits."""
    cache = lambda pages, dtype=jnp.float8_e4m3fn: jax.ShapeDtypeStruct((8, pages, 64, 8, 128), dtype)  # noqa: E731
    assert decode_attention.supports(cache(4096))                  # 2 GiB exactly: the last offset fits
    assert not decode_attention.supports(cache(4097))
    assert not decode_attention.supports(cache(8192))              # 4 GiB: still 32-bit offsets
    assert decode_attention.supports(cache(8193))                  # 64-bit offsets
    assert decode_attention.supports(cache(4097, jnp.bfloat16))
    assert not decode_attention.supports(jax.ShapeDtypeStruct((1, 4, 48, 8, 128), jnp.bfloat16))   # page size
    q = jax.ShapeDtypeStruct((1, 1, 48, 128), jnp.bfloat16)
    one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="2\\*\\*31 entries"):
        jax.eval_shape(decode_attention.paged_decode_attention, q, cache(4097), cache(4097), one, one, jnp.int32(0))


def test_auto_backends_are_the_kernels_on_gpus_for_16_bit_models_only(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.resolve_backend("auto", jnp.bfloat16) == "cudnn"
    assert attention.resolve_decode_backend("auto", jnp.bfloat16) == "pallas"
    # cuDNN's flash attention takes no float32; a float32 model keeps full-precision products
    assert attention.resolve_backend("auto", jnp.float32) == "xla"
    assert attention.resolve_decode_backend("auto", jnp.float32) == "xla"
    assert attention.resolve_backend("cudnn", jnp.float32) == "cudnn"      # named: as asked
