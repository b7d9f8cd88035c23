"""Rows rounded to FP8 with one scale per row and 128 columns in one Pallas (Triton) kernel.

The W8A8 projections take their rows as `quant.fp8.quantize_groups` rounds them. In XLA that is
a reduction kernel for each group's amax and a second pass that divides and converts: at a DEP2
prefill step's 8192 rows on an H200, 53 + 33 us a layer for attention's input and 50 + 34 us for
o_proj's (docs/benchmarks.md, run GD), where reading the bf16 rows once and writing the codes
takes 19 and 37 us at the copy bandwidth. A program here reads a tile of rows for one group of
columns once and writes their codes and the group's scale, the amax taken from the values in
registers (as `nvfp4_tokens.fp8_groups` does for the NVFP4 dispatch). With a norm it also
applies RMSNorm first, the rows' fp32 statistics taken by XLA beforehand, so the normalised rows
are never written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minimax_jax.ops import triton_common
from quant import fp8

GROUP = 128
ROWS_PER_PROGRAM = 32


def supports(x: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether `quantize_groups` takes x: rows [M, K] of 16-bit floats, K a multiple of GROUP."""
    return x.ndim == 2 and x.shape[1] % GROUP == 0 and x.dtype in (jnp.bfloat16, jnp.float16)


def quantize_groups(x: jax.Array, norm_weight: jax.Array | None = None, eps: float = 1e-6, *,
                    rows_per_program: int = ROWS_PER_PROGRAM, num_warps: int = 4,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`quant.fp8.quantize_groups(x, 128)` of x [M, K] (bf16 or fp16): (codes [M, K]
    float8_e4m3fn, scales [M, K / 128] float32), each value computed as it computes it (the
    group's amax over finite values, the scale amax / 448 or 1 for an all-zero group, the
    values divided by it, clipped to +-448, rounded to nearest even).

    norm_weight [K]: the rows `model.rms_norm(x, norm_weight, eps)` gives are rounded instead
    (fp32 statistics, the normalised row cast to x's dtype, then scaled by the weight in x's
    dtype); they are not written."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if not supports(x) or (norm_weight is not None and norm_weight.shape != (x.shape[1],)):
        raise ValueError(f"quantize_groups takes 16-bit rows [M, K] with K a multiple of {GROUP} and a norm "
                         f"weight [K]; got x {x.shape} {x.dtype}, norm weight "
                         f"{None if norm_weight is None else norm_weight.shape}")
    m, k = x.shape
    normed = norm_weight is not None
    if normed:
        xf = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + eps)
        extra = [inv_rms, norm_weight.astype(x.dtype)]
    else:
        extra = []

    def kernel(x_ref, *refs):
        *norm_refs, codes_ref, scales_ref = refs
        i, j = pl.program_id(0), pl.program_id(1)
        rows = i * rows_per_program + jnp.arange(rows_per_program)
        live = rows < m
        cols = j * GROUP + jnp.arange(GROUP)
        values = pltriton.load(x_ref.at[rows[:, None], cols[None, :]], mask=live[:, None], other=0)
        if normed:
            inv_ref, w_ref = norm_refs
            inv = pltriton.load(inv_ref.at[rows], mask=live, other=1.0)
            scaled = (values.astype(jnp.float32) * inv[:, None]).astype(x.dtype)
            values = w_ref[pl.ds(j * GROUP, GROUP)][None, :] * scaled
        values = values.astype(jnp.float32)
        amax = jnp.max(jnp.where(jnp.isfinite(values), jnp.abs(values), 0.0), axis=1)
        scale = triton_common.divide(amax, jnp.full_like(amax, fp8.E4M3_MAX), ptx=not interpret)
        scale = jnp.where(scale > 0, scale, 1.0)
        # XLA divides by a broadcast as a product with the reciprocal: so does `quant.fp8`'s form
        reciprocal = triton_common.divide(jnp.ones_like(scale), scale, ptx=not interpret)
        codes = jnp.clip(values * reciprocal[:, None], -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(jnp.float8_e4m3fn)
        pltriton.store(codes_ref.at[rows[:, None], cols[None, :]], jax.lax.bitcast_convert_type(codes, jnp.uint8),
                       mask=live[:, None])
        pltriton.store(scales_ref.at[rows, j], scale, mask=live)

    whole = triton_common.whole_block
    codes, scales = pl.pallas_call(
        kernel, grid=(pl.cdiv(m, rows_per_program), k // GROUP),
        in_specs=[whole(x.shape)] + [whole(a.shape) for a in extra],
        out_specs=[whole((m, k)), whole((m, k // GROUP))],
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.uint8), jax.ShapeDtypeStruct((m, k // GROUP), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="fp8_rows_quantize_groups",
    )(x, *extra)
    return jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn), scales
