"""Where the paged decode attention kernel's time goes, on one GPU, at W1's DEP4 decode shape
(303 slots per rank, contexts of about 900-1000 tokens, FP8 cache, 64-token pages, 48 query and 8
KV heads of 128):

    python benchmarks/decode_attention_probe.py [--slots 303] [--layers 16] [--variants TEXT ...]

Each variant runs over every layer of an --layers-deep cache inside one jitted scan (as the
model's layer loop does: no layer's keys stay in L2, and the host's dispatch is paid once), so
the time per layer is device time. Variants: the engine's kernel on the engine's cache layout
[layers, pages, page_size, kv_heads, D], with and without loading each block ahead of its
arithmetic, with its options (block size, warps, stages, bf16 arithmetic, libdevice's exp);
the same kernel body on a heads-major page layout
[layers, pages, kv_heads, page_size, D] (each head's keys of a page contiguous); the same loads
with the arithmetic replaced by a sum (what the access pattern alone costs); and an XLA sum over
each layer's whole cache (a streaming read of the same bytes). Prints one line per variant:
time per layer, the bandwidth of the bytes attended, and the error against the reference.
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minimax_jax.ops import attention as attn_ops  # noqa: E402
from minimax_jax.ops import decode_attention, triton_common  # noqa: E402
from scripts.bench import median_time  # noqa: E402

INTERPRET = jax.default_backend() != "gpu"      # a CPU run checks the variants' numbers only


def heads_major_attention(q, k_cache, v_cache, page_table, positions, layer, *, block_keys=64, num_warps=2,
                          num_stages=5, read_only=False, heads_major=True, prefetch=False):
    """decode_attention.paged_decode_attention's program per (slot, KV head) on a cache laid out
    [layers, pages, kv_heads, page_size, D] (heads_major) or the engine's layout."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    b, _, hq, d = q.shape
    if heads_major:
        layers, pages, hk, page_size, _ = k_cache.shape
    else:
        layers, pages, page_size, hk, _ = k_cache.shape
    ppb = max(1, block_keys // page_size)
    group = hq // hk
    rows = max(decode_attention.MIN_ROWS, triton_common.next_power_of_two(group))
    qg = jnp.pad(q.reshape(b, hk, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    per_slot = -(-page_table.shape[1] // ppb) * ppb
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, per_slot - page_table.shape[1])))
    k_flat = k_cache.reshape(layers * pages, *k_cache.shape[2:])
    v_flat = v_cache.reshape(layers * pages, *v_cache.shape[2:])
    if heads_major:
        cache_spec = pl.BlockSpec((layers * pages, None, page_size, d), lambda i, h: (0, h, 0, 0))
    else:
        cache_spec = pl.BlockSpec((layers * pages, page_size, None, d), lambda i, h: (0, 0, h, 0))
    body = _read_only if read_only else functools.partial(decode_attention._kernel, prefetch=prefetch,
                                                          scalar_page=ppb == 1)
    kernel = functools.partial(body, pages_per_block=ppb, page_size=page_size, num_pages=pages,
                               max_length=per_slot * page_size, scale=d ** -0.5)
    out = pl.pallas_call(
        kernel, grid=(b, hk),
        in_specs=[pl.BlockSpec((1,), lambda i, h: (0,)),
                  pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)), cache_spec, cache_spec,
                  pl.BlockSpec((None, per_slot), lambda i, h: (i, 0)), pl.BlockSpec((None, 1), lambda i, h: (i, 0))],
        out_specs=pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=INTERPRET,
    )(jnp.asarray(layer, jnp.int32).reshape(1), qg, k_flat, v_flat, table, positions[:, :1].astype(jnp.int32))
    return out[:, :, :group].reshape(b, 1, hq, d)


def _read_only(layer_ref, q_ref, k_ref, v_ref, pages_ref, position_ref, o_ref, *, pages_per_block, page_size,
               num_pages, max_length, scale):
    """The attention kernel's loads with a column sum in place of its arithmetic."""
    from jax.experimental import pallas as pl
    rows, d = q_ref.shape
    block_k = pages_per_block * page_size

    def block(i, acc):
        if pages_per_block == 1:        # a scalar page index, as the engine kernel loads one page
            pages = layer_ref[0] * num_pages + pages_ref[i]
        else:
            pages = layer_ref[0] * num_pages + pages_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_k, d).astype(jnp.float32)
        v = v_ref[pages].reshape(block_k, d).astype(jnp.float32)
        return acc + (k + v).sum(axis=0)

    length = jnp.minimum(position_ref[0] + 1, max_length)
    acc = jax.lax.fori_loop(0, pl.cdiv(length, block_k), block, jnp.zeros((d,), jnp.float32))
    o_ref[...] = jnp.broadcast_to(acc[None, :], (rows, d)).astype(o_ref.dtype)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=303)
    p.add_argument("--context", type=int, default=1000, help="contexts drawn from [0.9, 1] x this")
    p.add_argument("--layers", type=int, default=16,
                   help="cache depth (16: each cache over 4 GiB, offset in 64 bits as at full depth)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads per device (2 on TP4); 6 query heads each")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--variants", nargs="+", metavar="TEXT",
                   help="run only the variants whose names contain one of these (the loads and the XLA stream always run)")
    args = p.parse_args()
    b, ps, layers = args.slots, args.page_size, args.layers
    per_slot = -(-args.context // ps)
    pages = b * per_slot
    rng = np.random.RandomState(0)
    table = jnp.asarray(rng.permutation(pages).reshape(b, per_slot), jnp.int32)
    positions = jnp.asarray(rng.randint(int(0.9 * args.context), args.context, (b, 1)), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    hk = args.kv_heads
    shape = (layers, pages, ps, hk, 128)
    k_cache = jax.random.normal(keys[0], shape, jnp.bfloat16).astype(jnp.float8_e4m3fn)
    v_cache = jax.random.normal(keys[1], shape, jnp.bfloat16).astype(jnp.float8_e4m3fn)
    q = jax.random.normal(keys[2], (b, 1, 6 * hk, 128), jnp.bfloat16)
    k_heads, v_heads = (c.transpose(0, 1, 3, 2, 4) for c in (k_cache, v_cache))
    attended = 2 * int(jnp.sum(positions + 1)) * hk * 128        # FP8 bytes of the visible keys and values
    ref = np.asarray(attn_ops.paged_attention_reference(q, k_cache, v_cache, table, positions, jnp.int32(1)),
                     np.float32)

    def over_layers(attend):       # the arrays are arguments: captured, they would be compiled in as constants
        def run(q, kc, vc, table, positions):
            def one(acc, layer):
                return acc + attend(q, kc, vc, table, positions, layer).astype(jnp.float32)[:, 0, 0, :4].sum(), None
            return jax.lax.scan(one, jnp.float32(0), jnp.arange(layers))[0]
        return jax.jit(run)

    @jax.jit
    def stream(kc, vc):
        def one(acc, layer):
            return acc + kc[layer].astype(jnp.float32).sum() + vc[layer].astype(jnp.float32).sum(), None
        return jax.lax.scan(one, jnp.float32(0), jnp.arange(layers))[0]

    engine_kernel = functools.partial(decode_attention.paged_decode_attention, interpret=INTERPRET)
    variants = [("engine kernel (64 keys, 5 stages, 2 warps, fp16, ex2)", engine_kernel, False),
                *[(f"{n} stages", functools.partial(engine_kernel, num_stages=n), False) for n in (2, 3, 4, 6, 8)],
                ("prefetch, 2 stages, 4 warps, vector index (before 2026-11-29)",
                 functools.partial(engine_kernel, prefetch=True, num_stages=2, num_warps=4, scalar_page=False), False),
                ("page index as a vector", functools.partial(engine_kernel, scalar_page=False), False),
                ("4 warps", functools.partial(engine_kernel, num_warps=4), False),
                ("8 warps", functools.partial(engine_kernel, num_warps=8), False),
                ("1 warp", functools.partial(engine_kernel, num_warps=1), False),
                ("128 keys", functools.partial(engine_kernel, block_keys=128), False),
                ("contexts not split", functools.partial(engine_kernel, splits=1), False),
                ("bf16 arithmetic", functools.partial(engine_kernel, compute_dtype=jnp.bfloat16), False),
                ("libdevice exp", functools.partial(engine_kernel, fast_exp=False), False),
                ("heads-major layout", functools.partial(heads_major_attention, block_keys=64), True),
                ("loads only, engine layout", functools.partial(heads_major_attention, read_only=True,
                                                                heads_major=False, block_keys=64), False)]
    rows = []
    if args.variants:
        variants = [v for v in variants if v[0].startswith(("engine kernel", "loads only"))
                    or any(text in v[0] for text in args.variants)]
    for name, attend, heads_major in variants:
        kc, vc = (k_heads, v_heads) if heads_major else (k_cache, v_cache)
        try:
            out = np.asarray(jax.jit(attend)(q, kc, vc, table, positions, jnp.int32(1)), np.float32)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            seconds = median_time(over_layers(attend), q, kc, vc, table, positions, warmup=1, iters=args.iters) / layers
        except Exception as e:  # noqa: BLE001 - a variant that does not lower is reported, the rest go on
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append((name, seconds, err))
        print(f"{name}: {seconds * 1e6:.0f} us/layer, {attended / seconds / 1e12:.2f} TB/s, rel err {err:.1e}",
              flush=True)
    whole = 2 * k_cache[0].nbytes
    seconds = median_time(stream, k_cache, v_cache, warmup=1, iters=args.iters) / layers
    rows.append(("XLA sum over each layer's whole cache", seconds, float("nan")))
    print(f"\n{b} slots, contexts {int(positions.min()) + 1}-{int(positions.max()) + 1}, {layers} layers, "
          f"{attended / 1e6:.0f} MB attended per layer ({whole / 1e6:.0f} MB in the layer's cache)")
    print(f"{'variant':<48} {'us/layer':>9} {'TB/s':>6} {'rel err':>8}")
    for name, seconds, err in rows:
        nbytes = whole if name.startswith("XLA") else attended
        print(f"{name:<48} {seconds * 1e6:>9.0f} {nbytes / seconds / 1e12:>6.2f} {err:>8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
