"""NVFP4 experts' grouped GEMM on group-aligned rows (`ops.aligned_rows`), weight-only, as a
Pallas (Triton) kernel that reads the codes in place from the weights stacked over layers.

Hopper has no FP4 tensor cores. Each program takes one tile of a group's rows and a block of
output channels, and walks K: the tile's codes (half a byte a weight) widen to fp32
(`triton_common.widen_nibbles`), the low and high nibbles joined back into column order, times
each 16 weights' E4M3 scale, to bf16 (exact: a code's 2 significant bits by a scale's 4), then one
bf16 dot with the rows on the tensor cores, summed in fp32; the tensor's global scale multiplies
the result. With widen="scaled" the codes widen straight to bf16 with their scales applied
(`triton_common.widen_scaled_nibbles`) and the low and high nibbles each take a dot against the
rows' even and odd columns, split once before the kernel. Before this kernel every layer's
experts were dequantised whole to bf16 before an XLA GEMM: 7.2 GB written and read again a layer
at full size, which also left no room for MiniMax-M2.5's 62 layers on one 141 GB GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minimax_jax.ops import triton_common
from minimax_jax.ops.triton_common import whole_block
from quant import nvfp4

GROUP = nvfp4.BLOCK_SIZE        # weights per E4M3 scale
WIDENINGS = ("ptx", "e4m3", "scaled")


def aligned_gemm_nvfp4(rows: jax.Array, block_group: jax.Array, codes: jax.Array, scales: jax.Array,
                       global_scales: jax.Array, layer: jax.Array | int = 0, *, block_m: int = 64,
                       block_n: int = 128, block_k: int = 128, num_warps: int = 4, num_stages: int = 3,
                       widen: str = "ptx", out_dtype=jnp.bfloat16, interpret: bool = False) -> jax.Array:
    """rows [M, K] (group-aligned, M a multiple of block_m) @ each block's expert's dequantised
    weights, transposed -> [M, N] in out_dtype.

    block_group: [M / block_m] int32, each tile's local expert (E or more: rows past the groups,
    written as zeros); codes: uint8 [L, E, N, K/2]; scales: float8_e4m3fn [L, E, N, K/16];
    global_scales: fp32 [L, E, G], N in G equal parts of one scale each (a gate/up pair: G = 2);
    layer: which of the L layers. Codes or scales the kernel would read at wrapped offsets
    (`triton_common.offsets_wrap`: 2-4 GiB of them, e.g. 62 layers' scales of 64 experts on a DEP4
    rank) are sliced to the layer first (a copy, 38 MB of scales there). widen: how codes become
    numbers, "ptx" (`triton_common.widen_nibbles`; E4M3 under the interpreter), "e4m3", or
    "scaled" (`triton_common.widen_scaled_nibbles`: bf16 weights with their scales applied in the
    widening, the rows split into even and odd columns here and two dots a step, one against the
    low nibbles and one against the high, so nothing interleaves the widened values)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, k = rows.shape
    layers, e, n, half_k = codes.shape
    parts = global_scales.shape[-1]
    if (half_k * 2 != k or m % block_m or block_group.shape != (m // block_m,) or k % block_k or block_k % GROUP
            or n % parts or (n // parts) % block_n or scales.shape != (layers, e, n, k // GROUP)
            or global_scales.shape[:2] != (layers, e)):
        raise ValueError(f"aligned_gemm_nvfp4 needs rows [M, K] in tiles of {block_m}, a group per tile, codes "
                         f"[L, E, N, K/2], scales [L, E, N, K/{GROUP}], global_scales [L, E, G] with N/G a multiple "
                         f"of block_n {block_n} and K of block_k {block_k}; got rows {rows.shape}, block_group "
                         f"{block_group.shape}, codes {codes.shape}, scales {scales.shape}, global_scales "
                         f"{global_scales.shape}")
    layer = jnp.asarray(layer, jnp.int32)
    # the layer each array is read at: a wrapping one is sliced to the layer (a copy), then read at 0
    code_layer, scale_layer = layer, layer
    if triton_common.offsets_wrap(codes):
        codes, code_layer = codes[layer][None], jnp.int32(0)
    if triton_common.offsets_wrap(scales):
        scales, scale_layer = scales[layer][None], jnp.int32(0)
    steps, step_bytes, step_groups = k // block_k, block_k // 2, block_k // GROUP
    if widen not in WIDENINGS:
        raise ValueError(f"widen must be one of {', '.join(WIDENINGS)}, got {widen!r}")
    ptx = widen != "e4m3" and not interpret
    scaled = widen == "scaled"
    if scaled:
        rows = triton_common.nibble_columns(rows)

    def kernel(layer_ref, group_ref, x_ref, w_ref, s_ref, g_ref, o_ref):
        expert, column_block = group_ref[0], pl.program_id(1)      # (read outside pl.when: the interpreter)

        @pl.when(expert >= e)
        def _():
            o_ref[...] = jnp.zeros((block_m, block_n), o_ref.dtype)

        @pl.when(expert < e)
        def _():
            tensor = layer_ref[0] * e + expert
            start = (layer_ref[1] * e + expert) * n + column_block * block_n
            scale_start = (layer_ref[2] * e + expert) * n + column_block * block_n

            def scaled_step(kb, acc):
                codes = w_ref[pl.ds(start, block_n), pl.ds(kb * step_bytes, step_bytes)]
                s = triton_common.scale_operand(
                    s_ref[pl.ds(scale_start, block_n), pl.ds(kb * step_groups, step_groups)])
                s = jnp.broadcast_to(s[:, :, None], (block_n, step_groups, GROUP // 2)).reshape(block_n, step_bytes)
                low, high = triton_common.widen_scaled_nibbles(codes, s, ptx)
                even = x_ref[:, pl.ds(kb * step_bytes, step_bytes)].astype(jnp.bfloat16)
                odd = x_ref[:, pl.ds(half_k + kb * step_bytes, step_bytes)].astype(jnp.bfloat16)
                return acc + pltriton.dot(even, low.T) + pltriton.dot(odd, high.T)

            def step(kb, acc):
                codes = w_ref[pl.ds(start, block_n), pl.ds(kb * step_bytes, step_bytes)]
                w = jnp.stack(triton_common.widen_nibbles(codes, ptx), axis=-1)           # column order
                s = s_ref[pl.ds(scale_start, block_n), pl.ds(kb * step_groups, step_groups)].astype(jnp.float32)
                w = (w.reshape(block_n, step_groups, GROUP) * s[:, :, None]).reshape(block_n, block_k)
                w = w.astype(jnp.bfloat16)
                x = x_ref[:, pl.ds(kb * block_k, block_k)].astype(jnp.bfloat16)
                return acc + pltriton.dot(x, w.T)

            acc = jax.lax.fori_loop(0, steps, scaled_step if scaled else step,
                                    jnp.zeros((block_m, block_n), jnp.float32))
            unit = triton_common.SCALED_NIBBLE_SCALE if scaled else triton_common.NIBBLE_SCALE
            scale = g_ref[tensor * parts + column_block * block_n // (n // parts)] * unit
            o_ref[...] = (acc * scale).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, grid=(m // block_m, n // block_n),
        in_specs=[whole_block((3,)), pl.BlockSpec((1,), lambda i, j: (i,)),
                  pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                  whole_block((codes.shape[0] * e * n, half_k)), whole_block((scales.shape[0] * e * n, k // GROUP)),
                  whole_block((layers * e * parts,))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="nvfp4_aligned_gemm",
    )(jnp.stack([layer, code_layer, scale_layer]), block_group.astype(jnp.int32), rows, codes.reshape(-1, half_k),
      scales.reshape(-1, k // GROUP), global_scales.astype(jnp.float32).reshape(-1))


def reference(rows: jax.Array, block_group: jax.Array, codes: jax.Array, scales: jax.Array,
              global_scales: jax.Array, layer: int = 0, block_m: int = 64) -> jax.Array:
    """`aligned_gemm_nvfp4` in XLA, fp32: every tile against its expert dequantised."""
    e, n = codes.shape[1], codes.shape[2]
    parts = global_scales.shape[-1]
    g = jnp.repeat(global_scales[layer], n // parts, axis=-1)[..., None]                    # [E, N, 1]
    w = nvfp4.dequantize(nvfp4.NVFP4Array(codes[layer], scales[layer], g))                  # [E, N, K]
    tiles = rows.astype(jnp.float32).reshape(-1, block_m, rows.shape[1])

    def tile(args):          # one tile at a time: a gathered expert per tile would not fit at full size
        x, group = args
        out = jnp.dot(x, w[jnp.minimum(group, e - 1)].T, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(group < e, out, 0.0)
    return jax.lax.map(tile, (tiles, block_group)).reshape(rows.shape[0], n)
