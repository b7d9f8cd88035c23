"""What the Pallas (Triton) kernels here share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DOT_MIN_ROWS = 16        # a Triton dot's smallest M (and N): fewer rows are padded to it


def power_of_two(n: int) -> bool:
    """Whether n is a size Triton takes for a block dimension."""
    return n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def whole_block(shape: tuple[int, ...]):
    """A Pallas BlockSpec that hands every program the whole array of this shape."""
    from jax.experimental import pallas as pl
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def fma(a: jax.Array, b: jax.Array, c: jax.Array, ptx: bool = True) -> jax.Array:
    """Inside a Pallas (Triton) kernel: a * b + c in fp32 (a and b broadcast to c's shape), by
    one `fma.rn.f32` a value on GPUs (ptx). Pallas's Triton kernels are compiled without
    contracting a multiply and an add into an FMA (Nsight Compute counted 0 fused FP32
    instructions in them, docs/benchmarks.md run FG), so a product added to a sum costs two
    instructions unless asked for one; off GPUs (Pallas's interpreter) the plain product and sum."""
    a, b = jnp.broadcast_to(a, c.shape), jnp.broadcast_to(b, c.shape)
    if not ptx:
        return a * b + c
    from jax.experimental.pallas import triton as pltriton
    return pltriton.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r",
                                           pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float32)])[0]


def divide(a: jax.Array, b: jax.Array, ptx: bool = True) -> jax.Array:
    """Inside a Pallas (Triton) kernel: a / b in fp32 rounded once (IEEE). On GPUs (ptx) by
    `div.rn.f32`, since Triton's lowering of an fp32 division does not promise one rounding; off
    GPUs (Pallas's interpreter) behind the barrier of `quant.exact.divide`, which keeps XLA from
    multiplying by the reciprocal instead."""
    a, b = jnp.broadcast_arrays(a.astype(jnp.float32), jnp.asarray(b, jnp.float32))
    if not ptx:
        from quant import exact
        return exact.divide(a, b)
    from jax.experimental.pallas import triton as pltriton
    return pltriton.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def offsets_wrap(array: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether a kernel would read `array` at wrapped addresses: Pallas's Triton lowering computes
    element offsets in signed 32 bits for arrays of at most 4 GiB, so one of more than 2**31
    entries but at most 4 GiB (8-bit entries only) is read at negative offsets (illegal-address
    faults on an H200, docs/benchmarks.md run BS). Larger arrays get 64-bit offsets."""
    entries = math.prod(array.shape)
    return entries > 2**31 and entries * jnp.dtype(array.dtype).itemsize <= 2**32


def k_splits(k_blocks: int) -> int:
    """Programs over K for a decode-size product whose K is k_blocks blocks (128 wide for FP8, a
    program's step of 256 for NVFP4): 4 when K is long (at least 12 blocks, a multiple of 4), else
    1. One request's projections and expert pairs on
    an H200 (benchmarks/fp8_linear_probe.py, docs/benchmarks.md run CE): 4 splits took qkv on TP2
    (24 blocks) 17.1 -> 12.1 us and TP4's o (12 blocks) 12.0 -> 9.7 us; a pair's down product on
    TP2 (6 blocks) was slower split in 2 (10.3 against 9.0 us)."""
    return 4 if k_blocks >= 12 and k_blocks % 4 == 0 else 1


NIBBLE_SCALE = 2.0 ** 14    # `widen_nibbles` returns the codes' values over this

# One byte's E2M1 nibble as an f16's bits: the code's 3 magnitude bits at the f16's two lowest
# exponent bits and highest mantissa bit read 2**-14 times its value (E2M1's 0.5 an f16 subnormal,
# exact), the sign at bit 15. Four bytes a register: prmt puts bytes 0, 1 and 2, 3 in the halves
# of two registers, then shifts and masks build two f16 pairs, widened to fp32.
_NIBBLES_PTX = """{{
.reg .b32 z, t0, t1, a, b, p0, p1;
.reg .b16 h0, h1, h2, h3;
mov.b32 z, 0;
prmt.b32 t0, $4, z, 0x4140;
prmt.b32 t1, $4, z, 0x4342;
shl.b32 a, t0, {magnitude};
and.b32 a, a, 0x0E000E00;
shl.b32 b, t0, {sign};
and.b32 b, b, 0x80008000;
or.b32 p0, a, b;
shl.b32 a, t1, {magnitude};
and.b32 a, a, 0x0E000E00;
shl.b32 b, t1, {sign};
and.b32 b, b, 0x80008000;
or.b32 p1, a, b;
mov.b32 {{h0, h1}}, p0;
mov.b32 {{h2, h3}}, p1;
cvt.f32.f16 $0, h0;
cvt.f32.f16 $1, h1;
cvt.f32.f16 $2, h2;
cvt.f32.f16 $3, h3;
}}"""


def nibble_columns(rows: jax.Array) -> jax.Array:
    """rows [M, K] as the NVFP4 kernels read them against codes [..., K/2]: the even columns (the
    codes' low nibbles) then the odd ones (the high nibbles)."""
    return jnp.concatenate([rows[:, 0::2], rows[:, 1::2]], axis=1)


def widen_nibbles(codes: jax.Array, ptx: bool = True) -> tuple[jax.Array, jax.Array]:
    """Inside a Pallas (Triton) kernel: fp32 values over NIBBLE_SCALE of the low and the high
    E2M1 nibbles of uint8 NVFP4 codes. ptx (GPUs only): inline PTX (`_NIBBLES_PTX`), about 3
    instructions a weight; else the E4M3 reading of `quant.nvfp4.e2m1_as_e4m3` through Triton's
    FP8 conversions (and Pallas's interpreter)."""
    from quant import nvfp4
    if not ptx:
        return tuple(v.astype(jnp.float32) * (64.0 / NIBBLE_SCALE) for v in nvfp4.e2m1_as_e4m3(codes))
    # low nibble: bits 0-2 to 9-11, 3 to 15; high: 4-6, 7
    ptx_of = lambda magnitude, sign: _NIBBLES_PTX.format(magnitude=magnitude, sign=sign)  # noqa: E731
    return _nibbles(ptx_of, ((9, 12), (5, 8)), [codes], "=f,=f,=f,=f,r", jnp.float32)


def _nibbles(ptx_of, shifts: tuple[tuple[int, int], ...], args: list[jax.Array], constraints: str,
             dtype) -> tuple[jax.Array, ...]:
    """The low and the high nibbles of args[0]'s codes by one inline asm each (Pallas lowers an
    asm of one result only), ptx_of(magnitude shift, sign shift) their PTX, 4 codes an asm."""
    from jax.experimental.pallas import triton as pltriton
    out = jax.ShapeDtypeStruct(args[0].shape, dtype)
    return tuple(pltriton.elementwise_inline_asm(ptx_of(*shift), args=args, constraints=constraints, pack=4,
                                                 result_shape_dtypes=[out])[0] for shift in shifts)


SCALED_NIBBLE_SCALE = 2.0 ** 7    # `widen_scaled_nibbles` returns codes' values times their scales over this
SCALE_OPERAND_FACTOR = 2.0 ** 119  # what `scale_operand` multiplies an E4M3 scale by

# One nibble of four bytes as bf16 pairs, each times its byte's scale operand. A code's 3 magnitude
# bits at a bf16's two lowest exponent bits and highest mantissa bit read 2**-126 times its value
# (E2M1's 0.5 a bf16 subnormal), the sign at bit 15; one packed multiply by the scale operand (the
# E4M3 scale times 2**119) gives value x scale / 2**7, exact: at most 6 significant bits.
_SCALED_PAIR_PTX = """
prmt.b32 t, $2, z, {selector};
shl.b32 a, t, {magnitude};
and.b32 a, a, 0x01C001C0;
shl.b32 b, t, {sign};
and.b32 b, b, 0x80008000;
or.b32 a, a, b;
mul.rn.bf16x2 {out}, a, {scale};"""


def _scaled_nibbles_ptx(magnitude: int, sign: int) -> str:
    """One nibble of 4 code bytes ($2) times their scale operands ($3, $4: two bf16 pairs) as two
    bf16 pairs ($0, $1)."""
    pairs = [_SCALED_PAIR_PTX.format(selector=selector, magnitude=magnitude, sign=sign, out=out, scale=scale)
             for selector, out, scale in (("0x4140", "$0", "$3"), ("0x4342", "$1", "$4"))]
    return "{\n.reg .b32 z, t, a, b;\nmov.b32 z, 0;" + "".join(pairs) + "\n}"


def scale_operand(scales: jax.Array) -> jax.Array:
    """E4M3 block scales as the bf16 operand of `widen_scaled_nibbles`: times 2**119, exact (the
    largest, 448, stays under bf16's maximum, the smallest subnormal 2**-9 far above its least)."""
    return (scales.astype(jnp.float32) * SCALE_OPERAND_FACTOR).astype(jnp.bfloat16)


def widen_scaled_nibbles(codes: jax.Array, scale: jax.Array, ptx: bool = True) -> tuple[jax.Array, jax.Array]:
    """Inside a Pallas (Triton) kernel: bf16 values of the low and the high E2M1 nibbles of uint8
    NVFP4 codes, each times its byte's scale, over SCALED_NIBBLE_SCALE. scale: bf16 of codes'
    shape, `scale_operand` of each byte's E4M3 scale. ptx (GPUs only): inline PTX
    (`_scaled_nibbles_ptx`, sm_90's `mul.rn.bf16x2`), bf16 pairs built by shifts and masks and
    one packed multiply, about 3.5 instructions a weight against `widen_nibbles`'s 3 and the fp32
    multiply and rounding after it; else the E4M3 reading of `quant.nvfp4.e2m1_as_e4m3` (Pallas's
    interpreter)."""
    from quant import nvfp4
    if not ptx:
        factor = scale.astype(jnp.float32) * (64.0 / SCALE_OPERAND_FACTOR / SCALED_NIBBLE_SCALE)
        return tuple((v.astype(jnp.float32) * factor).astype(jnp.bfloat16) for v in nvfp4.e2m1_as_e4m3(codes))
    # low nibble: bits 0-2 to 6-8, 3 to 15; high: 4-6, 7
    return _nibbles(_scaled_nibbles_ptx, ((6, 12), (2, 8)), [codes, scale], "=r,=r,r,r,r", jnp.bfloat16)
