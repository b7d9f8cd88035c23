"""A few tokens' routed experts in FP8 or NVFP4, each (token, expert) pair against its own
expert's weights read in place from the weights stacked over layers and experts.

One request's decode picks 8 experts a layer. The grouped GEMM path would stream every local
expert (or, in its row buckets, whole 128-row tiles per expert); the per-pair path of
`moe.per_pair_experts` gathers the 8 experts' blocks and dequantises them into bf16 copies before
two einsums, writing and reading again twice the FP8 bytes. Here a Pallas (Triton) kernel runs
one program per (pair, block of output channels) that walks its expert's FP8 rows once, widening
them in registers: weight-only numbers (the rows are not rounded), products and sums in fp32.
`pair_products_nvfp4` does the same for ModelOpt's NVFP4 experts, reading half a byte a weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimax_jax.ops import grouped_gemm_ws, triton_common
from minimax_jax.ops.triton_common import whole_block
from quant import nvfp4

BLOCK = grouped_gemm_ws.SCALE_BLOCK      # the FP8 checkpoint's scale block, along N and K


def pair_products(rows: jax.Array, w: jax.Array, w_scale: jax.Array, layer: jax.Array | int, experts: jax.Array,
                  *, pairs_per_row: int = 1, block_n: int = 32, splits: int | None = None, num_warps: int = 4,
                  num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """Pair r: rows[r // pairs_per_row] @ dequantised w[layer, experts[r]].T -> fp32 [R, N].

    rows: [>= R / pairs_per_row, K] (a token's row serves its pairs_per_row choices without a
    copy per pair); w: [L, E, N, K] float8_e4m3fn (rows = output channels; a gate/up pair
    [L, E, 2, I, K] passes as N = 2I); w_scale: [L, E, N/128, K/128] fp32; experts: [R] int32,
    taken as 0 outside [0, E) (the caller drops those pairs). splits: programs over K per (pair,
    block of channels), their partial sums added after the kernel; None:
    `pair_splits`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    r, k = experts.size, rows.shape[1]
    layers, e, n, k2 = w.shape
    splits = splits or pair_splits(k // BLOCK, r * (n // block_n))
    if (k != k2 or n % BLOCK or k % BLOCK or BLOCK % block_n or w_scale.shape != (layers, e, n // BLOCK, k // BLOCK)
            or (k // BLOCK) % splits or not supports(w) or rows.shape[0] * pairs_per_row < r):
        raise ValueError(f"pair_products needs a row [K] for every {pairs_per_row} of the {r} pairs, w [L, E, N, K] and "
                         f"w_scale [L, E, N/{BLOCK}, K/{BLOCK}] with N and K multiples of {BLOCK}, block_n dividing "
                         f"{BLOCK}, splits dividing K/{BLOCK}, and w of at most 2**31 entries or over 4 GiB; got rows "
                         f"{rows.shape}, w {w.shape}, w_scale {w_scale.shape}, block_n {block_n}")

    def kernel(layer_ref, expert_ref, x_ref, w_ref, s_ref, o_ref):
        expert = expert_ref[0]
        expert = jnp.where((expert >= 0) & (expert < e), expert, 0)
        # the pair's first row in the weights flattened to [L * E * N, K]
        start = (layer_ref[0] * e + expert) * n + pl.program_id(1) * block_n
        scale_row = start // BLOCK

        # products added per column (one FMA a weight, the block's scale folded into the row's
        # values) and summed along K once at the end, not across the program's threads every step
        def step(kb, total):
            cols = pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)
            wb = w_ref[pl.ds(start, block_n), cols].astype(jnp.float32)
            xb = x_ref[cols].astype(jnp.float32) * s_ref[scale_row, kb]
            return triton_common.fma(wb, xb[None, :], total, ptx=not interpret)

        per_split = k // BLOCK // splits
        first = pl.program_id(2) * per_split
        total = jax.lax.fori_loop(first, first + per_split, step, jnp.zeros((block_n, BLOCK), jnp.float32))
        o_ref[...] = jnp.sum(total, axis=1)

    out = pl.pallas_call(
        kernel, grid=(r, n // block_n, splits),
        in_specs=[whole_block((1,)), pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
                  pl.BlockSpec((None, k), lambda i, j, s: (i // pairs_per_row, 0)),
                  whole_block((layers * e * n, k)), whole_block((layers * e * n // BLOCK, k // BLOCK))],
        out_specs=pl.BlockSpec((None, None, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, r, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="fp8_pair_products",
    )(jnp.asarray(layer, jnp.int32).reshape(1), experts.astype(jnp.int32).reshape(r, 1), rows,
      w.reshape(layers * e * n, k), w_scale.reshape(layers * e * n // BLOCK, k // BLOCK))
    return out.sum(axis=0)


PAIR_PROGRAMS = 768         # about 6 programs an SM on an H200's 132


def pair_splits(k_blocks: int, programs: int) -> int:
    """Programs over K for `pair_products`, whose programs each sum along K once at the end: the
    fewest of 1, 2, 4, 8 dividing K's 128-wide blocks that give at least PAIR_PROGRAMS programs
    (`programs` a split). One token's 8 pairs on an H200 (benchmarks/fp8_linear_probe.py,
    docs/benchmarks.md runs FI, FJ): TP1's gate/up (768 programs) 23.8 us in one split against
    26.6 in 4; TP2's (384) 14.1 in 2 against 15.1 in 4; TP4's (192) best in 4."""
    for splits in (1, 2, 4, 8):
        if k_blocks % splits == 0 and (programs * splits >= PAIR_PROGRAMS or k_blocks % (splits * 2)):
            return splits
    return 8


def nvfp4_block_k(k: int) -> int:
    """Weights a program widens per step along K: 256 (128 bytes of codes a row), or the largest
    smaller power of two dividing K (TP4's down product: K = 384)."""
    return next(b for b in (256, 128, 64, 32, 16) if k % b == 0)


def pair_products_nvfp4(rows: jax.Array, codes: jax.Array, scales: jax.Array, global_scales: jax.Array,
                        layer: jax.Array | int, experts: jax.Array, *, pairs_per_row: int = 1, block_n: int = 32,
                        block_k: int | None = None, splits: int | None = None, num_warps: int = 4,
                        num_stages: int = 3, widen: str = "ptx", interpret: bool = False) -> jax.Array:
    """Pair r: rows[r // pairs_per_row] @ dequantised w[layer, experts[r]].T -> fp32 [R, N], w
    in NVFP4 (`quant.nvfp4`: two E2M1 codes a byte, an E4M3 scale per 16 weights, an fp32 scale
    per tensor).

    codes: uint8 [L, E, N, K/2]; scales: float8_e4m3fn [L, E, N, K/16]; global_scales: fp32
    [L, E, G], the N rows in G equal parts of one global scale each (a gate/up pair's two
    tensors: G = 2); experts as `pair_products`; block_k: None `nvfp4_block_k`; splits: None
    `triton_common.k_splits` of K's steps of block_k. The rows are read as two halves, the even
    and the odd columns (the codes' low and high nibbles), split here, where XLA folds it into the
    rows' producer. Scales the kernel would read at wrapped offsets (`triton_common.offsets_wrap`:
    2-4 GiB of them, e.g. 62 layers' gate/up on TP4) are gathered for the pairs first, one small
    XLA gather. widen: how codes become fp32, "ptx" (`triton_common.widen_nibbles`; the
    interpreter's E4M3 reading off GPUs) or "e4m3" (through E4M3 in Triton's own conversions)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    r, k = experts.size, rows.shape[1]
    layers, e, n, half_k = codes.shape
    parts = global_scales.shape[-1]
    group = nvfp4.BLOCK_SIZE                        # weights per E4M3 scale
    block_k = block_k or nvfp4_block_k(k)
    splits = splits or triton_common.k_splits(k // block_k)
    if (half_k * 2 != k or k % (block_k * splits) or n % parts or (n // parts) % block_n
            or scales.shape != (layers, e, n, k // group) or global_scales.shape[:2] != (layers, e)
            or not supports(codes) or rows.shape[0] * pairs_per_row < r):
        raise ValueError(f"pair_products_nvfp4 needs a row [K] for every {pairs_per_row} of the {r} pairs, codes "
                         f"[L, E, N, K/2], scales [L, E, N, K/{group}], global_scales [L, E, G] with N/G a multiple "
                         f"of block_n {block_n}, K a multiple of block_k {block_k} x splits {splits}, and codes of at "
                         f"most 2**31 entries or over 4 GiB; got rows {rows.shape}, codes {codes.shape}, scales "
                         f"{scales.shape}, global_scales {global_scales.shape}")
    steps = k // block_k // splits
    step_bytes, step_groups = block_k // 2, block_k // group
    if widen not in ("ptx", "e4m3"):
        raise ValueError(f"widen must be ptx or e4m3, got {widen!r}")
    widened = functools.partial(triton_common.widen_nibbles, ptx=widen == "ptx" and not interpret)
    gathered = triton_common.offsets_wrap(scales)
    if gathered:
        safe = jnp.where((experts >= 0) & (experts < e), experts, 0)
        scales = jnp.asarray(scales)[jnp.asarray(layer, jnp.int32), safe][None]             # [1, R, N, K/16]

    def kernel(layer_ref, expert_ref, x_ref, w_ref, s_ref, g_ref, o_ref):
        expert = expert_ref[0]
        expert = jnp.where((expert >= 0) & (expert < e), expert, 0)
        tensor = layer_ref[0] * e + expert
        start = tensor * n + pl.program_id(1) * block_n
        scale_start = (pl.program_id(0) * n + pl.program_id(1) * block_n) if gathered else start
        global_scale = g_ref[tensor * parts + pl.program_id(1) * block_n // (n // parts)]

        def step(kb, acc):
            low, high = widened(w_ref[pl.ds(start, block_n), pl.ds(kb * step_bytes, step_bytes)])
            even = x_ref[pl.ds(kb * step_bytes, step_bytes)].astype(jnp.float32)
            odd = x_ref[pl.ds(half_k + kb * step_bytes, step_bytes)].astype(jnp.float32)
            products = low * even[None, :] + high * odd[None, :]
            per_scale = jnp.sum(products.reshape(block_n, step_groups, group // 2), axis=2)
            s = s_ref[pl.ds(scale_start, block_n), pl.ds(kb * step_groups, step_groups)].astype(jnp.float32)
            return acc + jnp.sum(per_scale * s, axis=1)

        first = pl.program_id(2) * steps
        acc = jax.lax.fori_loop(first, first + steps, step, jnp.zeros((block_n,), jnp.float32))
        o_ref[...] = acc * (global_scale * triton_common.NIBBLE_SCALE)

    out = pl.pallas_call(
        kernel, grid=(r, n // block_n, splits),
        in_specs=[whole_block((1,)), pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
                  pl.BlockSpec((None, k), lambda i, j, s: (i // pairs_per_row, 0)),
                  whole_block((layers * e * n, half_k)), whole_block((scales.size // (k // group), k // group)),
                  whole_block((layers * e * parts,))],
        out_specs=pl.BlockSpec((None, None, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, r, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="nvfp4_pair_products",
    )(jnp.asarray(layer, jnp.int32).reshape(1), experts.astype(jnp.int32).reshape(r, 1),
      triton_common.nibble_columns(rows),
      codes.reshape(layers * e * n, half_k), scales.reshape(-1, k // group),
      global_scales.astype(jnp.float32).reshape(-1))
    return out.sum(axis=0)


def supports_nvfp4(w13: jax.Array | jax.ShapeDtypeStruct, w2: jax.Array | jax.ShapeDtypeStruct,
                   block_n: int = 32) -> bool:
    """Whether `pair_products_nvfp4` takes experts as `model.Experts` holds NVFP4 ones (w13 codes
    [..., E, 2, I, H/2], w2 [..., E, H, I/2]): I and H multiples of block_n (each half of gate/up
    and down's output in blocks of channels; 16 for the scales), offsets read right."""
    inter, hidden = w13.shape[-2], w2.shape[-2]
    return inter % block_n == 0 and hidden % block_n == 0 and supports(w13) and supports(w2)


def supports(w: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether the kernel reads these weights at the right offsets (`triton_common.offsets_wrap`)."""
    return not triton_common.offsets_wrap(w)


def reference(rows: jax.Array, w: jax.Array, w_scale: jax.Array, layer: jax.Array | int,
              experts: jax.Array) -> jax.Array:
    """`pair_products` in XLA: each pair's expert dequantised to fp32."""
    from quant import fp8
    picked = fp8.dequantize_blockwise(w[layer][experts], w_scale[layer][experts])       # [R, N, K]
    return jnp.einsum("rk,rnk->rn", rows.astype(jnp.float32), picked, precision=jax.lax.Precision.HIGHEST)


def reference_nvfp4(rows: jax.Array, codes: jax.Array, scales: jax.Array, global_scales: jax.Array,
                    layer: jax.Array | int, experts: jax.Array) -> jax.Array:
    """`pair_products_nvfp4` in XLA: each pair's expert dequantised to fp32."""
    layers, e, n, _ = codes.shape
    parts = global_scales.shape[-1]
    g = jnp.repeat(global_scales[layer][experts], n // parts, axis=-1)[..., None]         # [R, N, 1]
    picked = nvfp4.dequantize(nvfp4.NVFP4Array(codes[layer][experts], scales[layer][experts], g))
    return jnp.einsum("rk,rnk->rn", rows.astype(jnp.float32), picked, precision=jax.lax.Precision.HIGHEST)
