"""The MoE dispatch's NVFP4 tokens in two Pallas (Triton) kernels: a device's tokens quantised
(`quantize`), and the gathered tokens made the W8A8 experts' FP8 groups (`fp8_groups`).

An NVFP4 all-gather delivers each token as `quant.nvfp4.quantize_activations`' payload (packed
E2M1 codes, then E4M3 block scales) and a float32 global scale; W8A8 experts take FP8 codes and
a scale per token and 128 columns. `quant.nvfp4.activations_to_fp8_groups` computes that in XLA:
317 us a layer for 32768 tokens of 3072 on an H200, 102 us here, against about 38 us for its
bytes; the quantisation of 8192 tokens 76 us in XLA, 57 us here (docs/benchmarks.md, run FT).
A program of `fp8_groups` reads a tile of rows' codes and block scales for one group of columns
once and writes their FP8 codes and the group's scale, the group's amax taken from the values
already in registers; a program of `quantize` takes a run of 16-element blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minimax_jax.ops import triton_common
from quant import nvfp4

ROWS_PER_PROGRAM = 32


def fp8_groups(payload: jax.Array, global_scale: jax.Array, hidden: int, group: int = 128, *,
               rows_per_program: int = ROWS_PER_PROGRAM, num_warps: int = 4,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """payload [N, H/2 + H/16] uint8 and global_scale [N, 1] float32 (`quantize_activations`) ->
    (FP8 codes [N, H] float8_e4m3fn, scales [N, H / group] float32): what
    `quant.nvfp4.activations_to_fp8_groups` returns, each value computed as it computes it (the
    code's value times its block scale, then times the global scale; the group's amax over finite
    values; the codes divided by amax / 448, clipped, rounded to nearest)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    n = payload.shape[0]
    if payload.ndim != 2 or payload.shape[1] != nvfp4.activation_payload_width(hidden) \
            or global_scale.shape != (n, 1) or hidden % group or group % nvfp4.BLOCK_SIZE \
            or not triton_common.power_of_two(group):
        raise ValueError(f"fp8_groups takes a payload [N, {nvfp4.activation_payload_width(hidden)}] of "
                         f"hidden={hidden}, global scales [N, 1] and a power-of-two group of whole NVFP4 blocks "
                         f"that divides hidden; got {payload.shape}, {global_scale.shape}, group {group}")
    code_bytes, scale_bytes_at = group // 2, hidden // 2
    bytes_per_block = nvfp4.BLOCK_SIZE // 2

    def kernel(payload_ref, g_ref, codes_ref, scales_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        rows = i * rows_per_program + jnp.arange(rows_per_program)
        live = rows < n
        cols = jnp.arange(code_bytes)
        code = pltriton.load(payload_ref.at[rows[:, None], (j * code_bytes + cols)[None, :]],
                             mask=live[:, None], other=0)
        scale_cols = scale_bytes_at + j * (group // nvfp4.BLOCK_SIZE) + cols // bytes_per_block   # each code's block
        scale_byte = pltriton.load(payload_ref.at[rows[:, None], scale_cols[None, :]], mask=live[:, None], other=0)
        block_scale = jax.lax.bitcast_convert_type(scale_byte, jnp.float8_e4m3fn).astype(jnp.float32)
        g = pltriton.load(g_ref.at[rows, 0], mask=live, other=1.0)
        low, high = triton_common.widen_nibbles(code, ptx=not interpret)
        values = [((v * triton_common.NIBBLE_SCALE) * block_scale) * g[:, None] for v in (low, high)]
        finite = [jnp.where(jnp.isfinite(v), jnp.abs(v), 0.0) for v in values]
        amax = jnp.maximum(jnp.max(finite[0], axis=1), jnp.max(finite[1], axis=1))
        scale = amax / nvfp4.E4M3_MAX
        scale = jnp.where(scale > 0, scale, 1.0)
        low_byte, high_byte = (jax.lax.bitcast_convert_type(
            jnp.clip(v / scale[:, None], -nvfp4.E4M3_MAX, nvfp4.E4M3_MAX).astype(jnp.float8_e4m3fn),
            jnp.uint8).astype(jnp.uint16) for v in values)
        # element 2c in the low byte of word c, 2c + 1 in the high one: the codes in column order
        pltriton.store(codes_ref.at[rows[:, None], (j * code_bytes + cols)[None, :]], low_byte | (high_byte << 8),
                       mask=live[:, None])
        pltriton.store(scales_ref.at[rows, j], scale, mask=live)

    whole = triton_common.whole_block
    words, scales = pl.pallas_call(
        kernel, grid=(pl.cdiv(n, rows_per_program), hidden // group),
        in_specs=[whole(payload.shape), whole(global_scale.shape)],
        out_specs=[whole((n, hidden // 2)), whole((n, hidden // group))],
        out_shape=[jax.ShapeDtypeStruct((n, hidden // 2), jnp.uint16),
                   jax.ShapeDtypeStruct((n, hidden // group), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="nvfp4_tokens_to_fp8_groups",
    )(payload, global_scale.astype(jnp.float32))
    codes = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(n, hidden),
                                         jnp.float8_e4m3fn)
    return codes, scales


BLOCKS_PER_PROGRAM = 256


def quantize(x: jax.Array, *, blocks_per_program: int = BLOCKS_PER_PROGRAM, num_warps: int = 4,
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`quant.nvfp4.quantize_activations` of x [N, H]: (payload [N, H/2 + H/16] uint8, global
    scale [N, 1] float32). The global scale is XLA's (a row reduction); a program then takes
    blocks_per_program 16-element blocks, reads each block's even and odd elements, and writes
    their packed codes and the block's scale byte, computed as `quant.nvfp4.quantize` computes
    them (inf counted as 6 * 448 * g in its block's amax, a block with a NaN given a NaN scale and
    codes 0, the codes by `encode_e2m1`)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    n, hidden = x.shape
    bs = nvfp4.BLOCK_SIZE
    if x.ndim != 2 or hidden % bs:
        raise ValueError(f"quantize takes tokens [N, H] with H a multiple of {bs}, got {x.shape}")
    blocks_per_row, total = hidden // bs, n * hidden // bs
    largest = nvfp4.E2M1_MAX * nvfp4.E4M3_MAX
    g = nvfp4.compute_global_scale(x, per_row=True, exact=False)

    def kernel(x_ref, g_ref, payload_ref):
        block = pl.program_id(0) * blocks_per_program + jnp.arange(blocks_per_program)
        live = block < total
        row, k = block // blocks_per_row, block % blocks_per_row
        pairs = jnp.arange(bs // 2)
        halves = [pltriton.load(x_ref.at[block[:, None], (2 * pairs + parity)[None, :]], mask=live[:, None],
                                other=0).astype(jnp.float32) for parity in (0, 1)]
        g_b = pltriton.load(g_ref.at[row, 0], mask=live, other=1.0)
        magnitude = [jnp.where(jnp.isinf(h), largest * g_b[:, None], jnp.abs(h)) for h in halves]
        amax = jnp.maximum(jnp.max(magnitude[0], axis=1), jnp.max(magnitude[1], axis=1))
        nan_count = sum(jnp.sum(jnp.isnan(h).astype(jnp.int32), axis=1) for h in halves)
        scale = jnp.minimum(amax / (nvfp4.E2M1_MAX * g_b), nvfp4.E4M3_MAX)
        scale = jnp.where(nan_count > 0, jnp.nan, scale).astype(jnp.float8_e4m3fn)
        denom = scale.astype(jnp.float32) * g_b
        ok = denom > 0                   # false for zero and NaN scales: those blocks get code 0
        low, high = (nvfp4.encode_e2m1(jnp.where(ok[:, None], h / jnp.where(ok, denom, 1.0)[:, None], 0.0))
                     for h in halves)
        pltriton.store(payload_ref.at[row[:, None], k[:, None] * (bs // 2) + pairs[None, :]], low | (high << 4),
                       mask=live[:, None])
        pltriton.store(payload_ref.at[row, hidden // 2 + k], jax.lax.bitcast_convert_type(scale, jnp.uint8),
                       mask=live)

    whole = triton_common.whole_block
    payload = pl.pallas_call(
        kernel, grid=(pl.cdiv(total, blocks_per_program),),
        in_specs=[whole((total, bs)), whole(g.shape)],
        out_specs=whole((n, nvfp4.activation_payload_width(hidden))),
        out_shape=jax.ShapeDtypeStruct((n, nvfp4.activation_payload_width(hidden)), jnp.uint8),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="nvfp4_tokens_quantize",
    )(x.reshape(total, bs), g)
    return payload, g
