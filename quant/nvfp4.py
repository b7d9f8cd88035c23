"""NVFP4 (NVIDIA ModelOpt convention): E2M1 codes, E4M3 block scales, one fp32 global scale.

Layout of a quantised [..., K] array (K a multiple of 16):
  codes        uint8          [..., K/2]   two E2M1 codes per byte; element k=2j in the LOW
                                           nibble, k=2j+1 in the HIGH nibble of byte j
  scales       float8_e4m3fn  [..., K/16]  one per 16 consecutive elements of the last axis
  global_scale float32        [] or [..., 1] ("weight_scale_2" in ModelOpt checkpoints)

  dequant: X[..., k] = e2m1(code[..., k]) * f32(scales[..., k // 16]) * global_scale

E2M1 code: bit 3 = sign, bits 0..2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.

Scale choice (ModelOpt): with A the amax of the global-scale domain and A_b the amax of a block,
  g   = A / (6 * 448)                          (1.0 if that is 0, e.g. an all-zero tensor)
  s_b = e4m3(min(A_b / (6 * g), 448))          (round to nearest even)
  code = e2m1(x / (f32(s_b) * g))              (round to nearest, ties to even, saturate at +-6)
An all-zero block gets s_b = 0 and codes 0, so it dequantises to exact zeros.

Non-finite input (E2M1 has neither inf nor NaN):
  * +-inf is left out of the amax for g, counts as 6 * 448 * g for its block's amax, and its
    code saturates to +-6: it dequantises to +-6 * 448 * g, the largest magnitude the format can
    express for that global scale (equal to the amax of the finite values when g is computed).
  * NaN is left out of the amax for g, but poisons its own 16-element block: that block's scale is
    e4m3 NaN (byte 0x7F) with all codes 0, so the whole block dequantises to NaN. Other blocks are
    unaffected.

Round-trip error bound (proved in docs/quantization.md, asserted in tests/test_quant_nvfp4.py).
With s = A_b / (6 g) <= 448 (always true when g is computed from the data), for every element:
  |dequant(quant(x)) - x| <= (17/96) * A_b + (6/1024) * g
and, for blocks whose scale is an e4m3 normal number (s_b >= 2^-6):
  |dequant(quant(x)) - x| <= max(|x| / 5, s_b * g / 4).
On N(0, 1) data the relative Frobenius error ||dequant(quant(x)) - x|| / ||x|| is 0.095
(measured; asserted < 0.1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from quant import fp8
from quant.exact import divide

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0

# The magnitudes of E2M1 codes 0..7; codes 8..15 are their negations (code 8 is -0.0).
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes. A tie goes to the even code: midpoint i sits between
# codes i and i+1, so ties round up exactly when i is odd.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclasses.dataclass(frozen=True)
class NVFP4Array:
    """A quantised [..., K] array; see the module docstring for the layout."""

    codes: jax.Array         # uint8 [..., K/2]
    scales: jax.Array        # float8_e4m3fn [..., K/16]
    global_scale: jax.Array  # float32, [] or [..., 1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the dequantised array."""
        return (*self.codes.shape[:-1], 2 * self.codes.shape[-1])


jax.tree_util.register_dataclass(
    NVFP4Array, data_fields=["codes", "scales", "global_scale"], meta_fields=[])


def nbytes_per_param() -> float:
    """Storage per element: half a byte of code plus one e4m3 scale byte per 16 elements
    (the single fp32 global scale per tensor is not counted)."""
    return 0.5 + 1.0 / BLOCK_SIZE


def activation_payload_width(hidden: int) -> int:
    """Last-axis length of the uint8 payload of `quantize_activations` for `hidden` features."""
    _check_block_axis(hidden)
    return hidden // 2 + hidden // BLOCK_SIZE


def _check_block_axis(k: int) -> None:
    if k % BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs the last axis K to be a multiple of {BLOCK_SIZE}, got K={k}")


# -- E2M1 codes --------------------------------------------------------------------------------


def encode_e2m1(y: ArrayLike) -> jax.Array:
    """E2M1 codes (uint8, one per element, low 4 bits) of `y`: nearest value, ties to even,
    saturating at +-6 (inf included); NaN gives code 0. Matches ml_dtypes.float4_e2m1fn casts
    on non-NaN input. Its operations also lower inside a Pallas (Triton) kernel (the sign read
    from the bits, not `signbit`), where `minimax_jax.ops.nvfp4_tokens` quantises with it."""
    y = jnp.asarray(y, jnp.float32)
    mag = jnp.abs(y)
    index = jnp.zeros(y.shape, jnp.uint8)
    for i, midpoint in enumerate(_E2M1_MIDPOINTS):
        above = (mag >= midpoint) if i % 2 else (mag > midpoint)
        index = index + above.astype(jnp.uint8)
    negative = ((jax.lax.bitcast_convert_type(y, jnp.uint32) >> 31) == 1) & ~jnp.isnan(y)
    return index | jnp.where(negative, jnp.uint8(8), jnp.uint8(0))


def decode_e2m1(codes: ArrayLike) -> jax.Array:
    """float32 values of 4-bit E2M1 codes (only the low 4 bits of each byte are read), by bit
    operations (`e2m1_as_e4m3`) and an exact scaling rather than a 16-entry table, which XLA
    computes as a gather: the dequantise + round of 16384 tokens of 3072 took 251 against 266 us
    on an H200 (docs/benchmarks.md, run FP)."""
    low, _ = e2m1_values(jnp.asarray(codes, jnp.uint8) & 0xF)
    return low


def pack_e2m1(codes: ArrayLike) -> jax.Array:
    """uint8 [..., K] codes (low 4 bits) -> uint8 [..., K/2]; element 2j goes to the low nibble."""
    codes = jnp.asarray(codes, jnp.uint8)
    k = codes.shape[-1]
    if k % 2:
        raise ValueError(f"pack_e2m1 needs an even last axis K, got K={k}")
    low, high = codes[..., 0::2] & 0xF, codes[..., 1::2] & 0xF
    return low | (high << 4)


def unpack_e2m1(packed: ArrayLike) -> jax.Array:
    """uint8 [..., K/2] -> uint8 [..., K] codes; inverse of `pack_e2m1`."""
    packed = jnp.asarray(packed, jnp.uint8)
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def e2m1_as_e4m3(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(low, high) nibbles of uint8 NVFP4 codes as float8_e4m3fn values 2**-6 times theirs.

    An E2M1 code's magnitude bits (2 of exponent, 1 of mantissa) placed as an E4M3 number's lowest
    exponent and highest mantissa bits read as its value over 64, subnormals included (E2M1's 0.5
    is E4M3's subnormal 2**-7), and the sign moves to bit 7: a few bit operations a weight, and
    the GPU's converter widens the FP8 (Hopper has no FP4 instructions; the Triton kernels of
    minimax_jax.ops widen NVFP4 weights this way)."""
    low = ((codes & 0x07) << 2) | ((codes & 0x08) << 4)
    high = ((codes >> 2) & 0x1C) | (codes & 0x80)
    as_fp8 = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)  # noqa: E731
    return as_fp8(low), as_fp8(high)


def e2m1_values(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 values of the (low, high) nibbles of uint8 NVFP4 codes, through `e2m1_as_e4m3`."""
    return tuple(v.astype(jnp.float32) * 64.0 for v in e2m1_as_e4m3(codes))


# -- scales -------------------------------------------------------------------------------------


def scales_to_bytes(scales: ArrayLike) -> jax.Array:
    """Bitcast float8_e4m3fn scales to uint8 (same shape)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(scales, jnp.float8_e4m3fn), jnp.uint8)


def scales_from_bytes(raw: ArrayLike) -> jax.Array:
    """Bitcast uint8 bytes back to float8_e4m3fn scales (same shape)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(raw, jnp.uint8), jnp.float8_e4m3fn)


def compute_global_scale(x: ArrayLike, per_row: bool = False, exact: bool = True) -> jax.Array:
    """ModelOpt global scale amax(|x|) / (6 * 448) over finite values, 1.0 where that is 0.

    per_row=False: one scalar for the whole array; per_row=True: float32 [..., 1], one per row of
    the last axis (per token for activations). exact: see `quantize`."""
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    a = jnp.where(jnp.isfinite(a), a, 0.0)
    amax = jnp.max(a, axis=-1, keepdims=True) if per_row else jnp.max(a)
    g = (divide if exact else jnp.divide)(amax, E2M1_MAX * E4M3_MAX)
    return jnp.where(g > 0, g, 1.0).astype(jnp.float32)


# -- quantise / dequantise ----------------------------------------------------------------------


def quantize(x: ArrayLike, global_scale: ArrayLike | None = None, exact: bool = True) -> NVFP4Array:
    """Quantise [..., K] (K % 16 == 0) to NVFP4.

    global_scale None: computed from amax(|x|) over the whole array (ModelOpt weights). Otherwise
    used as given: a scalar or an array broadcastable to [..., 1] (e.g. per-token scales). The
    error bound needs every block amax <= 6 * 448 * global_scale; larger blocks saturate.
    exact: every division rounded once, as ModelOpt's (`quant.exact.divide`, whose barrier keeps
    XLA from fusing the passes around it); False: plain divisions, which XLA may compute by a
    reciprocal (a last-bit difference, which moves a code or a block's scale only where the
    quotient lies within a last bit of a midpoint) and fuses with the passes around it, as the
    activations of the dispatch need (docs/benchmarks.md, run FR)."""
    x = jnp.asarray(x, jnp.float32)
    _check_block_axis(x.shape[-1])
    if global_scale is None:
        g = compute_global_scale(x, exact=exact)
    else:
        g = jnp.asarray(global_scale, jnp.float32)
    div = divide if exact else jnp.divide
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    g_b = g[..., None]   # broadcasts against [..., K/16, 16]
    scale = _block_scales(blocks, g_b, div)
    # the barrier keeps the E4M3 rounding of the scale the codes divide by: XLA's GPU compiler
    # drops a conversion to FP8 and back as excess precision, and divided by the unrounded scale
    # 5% of the codes were another than the stored scale gives (docs/benchmarks.md, run FT)
    denom = jax.lax.optimization_barrier(scale).astype(jnp.float32) * g_b
    ok = denom > 0       # false for zero (and NaN) scales: those blocks get code 0
    y = jnp.where(ok, div(blocks, jnp.where(ok, denom, 1.0)), 0.0)
    codes = encode_e2m1(y).reshape(x.shape)
    return NVFP4Array(codes=pack_e2m1(codes), scales=scale[..., 0], global_scale=g)


def _block_scales(blocks: jax.Array, g_b: jax.Array, div=divide) -> jax.Array:
    """e4m3 scales [..., K/16, 1] of blocks [..., K/16, 16]; see the module docstring."""
    a = jnp.abs(blocks)
    a = jnp.where(jnp.isinf(a), E2M1_MAX * E4M3_MAX * g_b, a)
    amax = jnp.max(a, axis=-1, keepdims=True)
    # Explicit, so the NaN poisoning does not depend on a backend's max semantics.
    amax = jnp.where(jnp.any(jnp.isnan(blocks), axis=-1, keepdims=True), jnp.nan, amax)
    s = jnp.minimum(div(amax, E2M1_MAX * g_b), E4M3_MAX)
    return s.astype(jnp.float8_e4m3fn)


def dequantize(q: NVFP4Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """NVFP4Array -> [..., K] array of `dtype` (computed in float32, then cast)."""
    values = decode_e2m1(unpack_e2m1(q.codes))
    k = values.shape[-1]
    blocks = values.reshape(*values.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    scale = jnp.asarray(q.scales, jnp.float8_e4m3fn).astype(jnp.float32)[..., None]
    g = jnp.asarray(q.global_scale, jnp.float32)[..., None]
    # code * scale is exact in f32 (2 + 4 significant bits), so only `* g` rounds.
    out = (blocks * scale) * g
    return out.reshape(values.shape).astype(dtype)


# -- activations: one uint8 payload per all-gather ----------------------------------------------


def quantize_activations(x: ArrayLike, exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """[..., H] -> (payload uint8 [..., H/2 + H/16], global_scale float32 [..., 1]).

    payload = packed codes followed by the e4m3 scale bytes along the last axis. The global scale
    is per row (token), so a token's quantisation never depends on the other tokens in the batch
    and the result is identical however the batch is split across devices. Divided plainly by
    default (`quantize`'s exact=False): this runs on every dispatch of the serving path."""
    g = compute_global_scale(x, per_row=True, exact=exact)
    q = quantize(x, g, exact=exact)
    return jnp.concatenate([q.codes, scales_to_bytes(q.scales)], axis=-1), g


def activations_to_fp8_groups(payload: ArrayLike, global_scale: ArrayLike, hidden: int,
                              group: int = 128) -> tuple[jax.Array, jax.Array]:
    """`quant.fp8.quantize_groups` of the float32 values of `quantize_activations`' payload: FP8
    codes [..., H] and a scale per row and `group` columns, what W8A8 experts take. Equal bit for
    bit to rounding `dequantize_activations(..., float32)`, but each group's amax comes from the
    codes' largest magnitude a block times its scale (products exact, then one rounding by the
    global scale, which keeps the order), so the dequantised values are never written: XLA
    computes them inside the pass that writes the codes (docs/benchmarks.md, run FR)."""
    payload = jnp.asarray(payload, jnp.uint8)
    if payload.shape[-1] != activation_payload_width(hidden) or group % BLOCK_SIZE or hidden % group:
        raise ValueError(f"an NVFP4 activation payload of hidden={hidden} has last axis "
                         f"{activation_payload_width(hidden)} and FP8 groups a multiple of {BLOCK_SIZE} that "
                         f"divides it; got {payload.shape[-1]} and group {group}")
    codes, scale_bytes = payload[..., : hidden // 2], payload[..., hidden // 2:]
    g = jnp.asarray(global_scale, jnp.float32)
    low, high = e2m1_values(codes)
    block_scale = scales_from_bytes(scale_bytes).astype(jnp.float32)                  # [..., H/16]
    largest = jnp.max(jnp.maximum(jnp.abs(low), jnp.abs(high)).reshape(*codes.shape[:-1], -1, BLOCK_SIZE // 2), -1)
    block_amax = (largest * block_scale) * g
    block_amax = jnp.where(jnp.isfinite(block_amax), block_amax, 0.0)                  # NaN blocks: as _finite_abs
    amax = jnp.max(block_amax.reshape(*block_amax.shape[:-1], -1, group // BLOCK_SIZE), -1)
    values = jnp.stack([low, high], axis=-1).reshape(*codes.shape[:-1], hidden // BLOCK_SIZE, BLOCK_SIZE)
    values = ((values * block_scale[..., None]) * g[..., None]).reshape(*codes.shape[:-1], hidden)
    return fp8.quantize_groups(values, group, amax=amax)


def dequantize_activations(payload: ArrayLike, global_scale: ArrayLike, hidden: int,
                           dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Inverse of `quantize_activations`: payload [..., H/2 + H/16] -> [..., H] of `dtype`."""
    payload = jnp.asarray(payload, jnp.uint8)
    width = activation_payload_width(hidden)
    if payload.shape[-1] != width:
        raise ValueError(f"NVFP4 activation payload for hidden={hidden} must have last axis "
                         f"{width}, got {payload.shape[-1]}")
    codes, scale_bytes = payload[..., : hidden // 2], payload[..., hidden // 2:]
    q = NVFP4Array(codes=codes, scales=scales_from_bytes(scale_bytes),
                   global_scale=jnp.asarray(global_scale, jnp.float32))
    return dequantize(q, dtype)
