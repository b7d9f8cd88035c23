"""Rows rounded to FP8 with one scale per row and 128 columns in one Pallas (Triton) kernel.

The W8A8 projections take their rows as `quant.fp8.quantize_groups` rounds them. In XLA that is
a reduction kernel for each group's amax and a second pass that divides and converts: at a DEP2
prefill step's 8192 rows on an H200, 53 + 33 us a layer for attention's input and 50 + 34 us for
o_proj's (docs/benchmarks.md, run GD), where reading the bf16 rows once and writing the codes
takes 18 and 36 us at the copy bandwidth; here 23 and 46 us (run GK). A program reads a tile of
rows for one group of columns once and writes their codes and the group's scale, the amax taken
from the values in registers (as `nvfp4_tokens.fp8_groups` does for the NVFP4 dispatch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.ops import triton_common
from quant import fp8

GROUP = 128
ROWS_PER_PROGRAM = 32
# on an H200 XLA's scales were amax times this in every group, amax / 448 rounded once in 44%
# (docs/benchmarks.md, run GM)
RECIPROCAL_E4M3_MAX = float(np.float32(1.0 / fp8.E4M3_MAX))


def supports(x: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether `quantize_groups` takes x: rows [M, K] of 16-bit floats, K a multiple of GROUP."""
    return x.ndim == 2 and x.shape[1] % GROUP == 0 and x.dtype in (jnp.bfloat16, jnp.float16)


def quantize_groups(x: jax.Array, *, rows_per_program: int = ROWS_PER_PROGRAM, num_warps: int = 4,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`quant.fp8.quantize_groups(x, 128)` of x [M, K] (bf16 or fp16): (codes [M, K]
    float8_e4m3fn, scales [M, K / 128] float32), each value computed as XLA computes it on the
    same backend (the group's amax over finite values, the scale amax / 448, on GPUs amax times
    fp32(1/448), or 1 for an all-zero group, the values times the scale's reciprocal, clipped to
    +-448, rounded to nearest even; a NaN stays NaN)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if not supports(x):
        raise ValueError(f"quantize_groups takes 16-bit rows [M, K] with K a multiple of {GROUP}; "
                         f"got x {x.shape} {x.dtype}")
    m, k = x.shape

    def kernel(x_ref, codes_ref, scales_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        rows = i * rows_per_program + jnp.arange(rows_per_program)
        live = rows < m
        cols = j * GROUP + jnp.arange(GROUP)
        values = pltriton.load(x_ref.at[rows[:, None], cols[None, :]], mask=live[:, None], other=0)
        values = values.astype(jnp.float32)
        amax = jnp.max(jnp.where(jnp.isfinite(values), jnp.abs(values), 0.0), axis=1)
        if interpret:
            scale = triton_common.divide(amax, fp8.E4M3_MAX, ptx=False)
        else:       # XLA's GPU compiler multiplies by 1/448 in fp32, `quant.exact`'s barrier notwithstanding
            scale = amax * RECIPROCAL_E4M3_MAX
        scale = jnp.where(scale > 0, scale, 1.0)
        # XLA divides by a broadcast as a product with the reciprocal: so does `quant.fp8`'s form
        reciprocal = triton_common.divide(jnp.ones_like(scale), scale, ptx=not interpret)
        codes = jnp.clip(values * reciprocal[:, None], -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(jnp.float8_e4m3fn)
        # a NaN stays NaN (E4M3's 0x7f): Triton's conversion on GPUs made it 0
        codes = jnp.where(jnp.isnan(values), jnp.uint8(0x7F), jax.lax.bitcast_convert_type(codes, jnp.uint8))
        pltriton.store(codes_ref.at[rows[:, None], cols[None, :]], codes, mask=live[:, None])
        pltriton.store(scales_ref.at[rows, j], scale, mask=live)

    whole = triton_common.whole_block
    codes, scales = pl.pallas_call(
        kernel, grid=(pl.cdiv(m, rows_per_program), k // GROUP),
        in_specs=[whole(x.shape)],
        out_specs=[whole((m, k)), whole((m, k // GROUP))],
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.uint8), jax.ShapeDtypeStruct((m, k // GROUP), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="fp8_rows_quantize_groups",
    )(x)
    return jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn), scales
