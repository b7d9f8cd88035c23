"""FP8 E4M3 weights with float32 scales: the released MiniMax-M2.5 / DeepSeek-V3 block format, and
a per-output-channel variant.

Blockwise ([..., N, K], block (bn, bk) = (128, 128) in the release):
  w_fp8      float8_e4m3fn [..., N, K]
  scale_inv  float32       [..., ceil(N/bn), ceil(K/bk)]   (edge blocks may be partial)
  w[..., n, k] = f32(w_fp8[..., n, k]) * scale_inv[..., n // bn, k // bk]
  scale_inv = amax(|block|) / 448 (1.0 for an all-zero block), w_fp8 = e4m3(clip(w / scale_inv,
  +-448)), rounded to nearest even.

Per channel: the same with one scale per row, float32 [..., N, 1] (amax over the last axis).

Non-finite input: +-inf is left out of the amax and saturates to +-448 * scale (the largest
finite magnitude of its block or row; +-448 if that has no finite non-zero value). NaN is left
out of the amax and stays NaN in its own element (e4m3fn has a NaN).

Round-trip error bound (derived in docs/quantization.md, asserted in tests/test_quant_fp8.py):
E4M3 keeps 3 mantissa bits, so rounding y = w / scale to nearest moves it by at most half an ulp:
2^-4 * |y| for normal |y| >= 2^-6, and 2^-10 (half the subnormal step 2^-9) below. Hence
  |dequant(quant(w)) - w| <= max(2^-4 * |w|, 2^-10 * scale)
for every element, with scale its block's scale_inv (or its row's scale). On N(0, 1) data the
relative Frobenius error is 0.0265 (measured; asserted < 0.03).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from quant.exact import divide

E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)


def _scale_from_amax(amax: jax.Array, exact: bool = True) -> jax.Array:
    scale = divide(amax, E4M3_MAX) if exact else amax / E4M3_MAX
    return jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)


def _finite_abs(w: jax.Array) -> jax.Array:
    a = jnp.abs(w)
    return jnp.where(jnp.isfinite(a), a, 0.0)


def _to_e4m3(y: jax.Array) -> jax.Array:
    return jnp.clip(y, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def _block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"blockwise FP8 needs an array [..., N, K], got shape {shape}")
    (n, k), (bn, bk) = shape[-2:], block
    return -(-n // bn), -(-k // bk)


def _to_tiles(w: jax.Array, block: tuple[int, int]) -> jax.Array:
    """[..., N, K] -> zero-padded [..., ceil(N/bn), bn, ceil(K/bk), bk]."""
    nb, kb = _block_grid(w.shape, block)
    (n, k), (bn, bk) = w.shape[-2:], block
    pad = [(0, 0)] * (w.ndim - 2) + [(0, nb * bn - n), (0, kb * bk - k)]
    return jnp.pad(w, pad).reshape(*w.shape[:-2], nb, bn, kb, bk)


def _from_tiles(tiles: jax.Array, n: int, k: int) -> jax.Array:
    nb, bn, kb, bk = tiles.shape[-4:]
    return tiles.reshape(*tiles.shape[:-4], nb * bn, kb * bk)[..., :n, :k]


def quantize_blockwise(w: ArrayLike, block: tuple[int, int] = DEFAULT_BLOCK
                       ) -> tuple[jax.Array, jax.Array]:
    """[..., N, K] -> (w_fp8 float8_e4m3fn [..., N, K],
    scale_inv float32 [..., ceil(N/bn), ceil(K/bk)])."""
    w = jnp.asarray(w, jnp.float32)
    tiles = _to_tiles(w, block)   # zero padding never raises an amax
    n, k = w.shape[-2:]
    scale_inv = _scale_from_amax(jnp.max(_finite_abs(tiles), axis=(-3, -1)))
    q = _to_e4m3(divide(tiles, scale_inv[..., :, None, :, None]))
    return _from_tiles(q, n, k), scale_inv


def dequantize_blockwise(w_fp8: ArrayLike, scale_inv: ArrayLike, dtype: DTypeLike = jnp.float32,
                         block: tuple[int, int] = DEFAULT_BLOCK) -> jax.Array:
    """Inverse of `quantize_blockwise`: f32(w_fp8) * scale_inv broadcast over its blocks,
    cast to `dtype`."""
    w = jnp.asarray(w_fp8).astype(jnp.float32)
    scale_inv = jnp.asarray(scale_inv, jnp.float32)
    grid = _block_grid(w.shape, block)
    if scale_inv.shape != (*w.shape[:-2], *grid):
        raise ValueError(f"scale_inv shape {scale_inv.shape} does not match weight {w.shape} "
                         f"with block {block}: expected {(*w.shape[:-2], *grid)}")
    n, k = w.shape[-2:]
    tiles = _to_tiles(w, block) * scale_inv[..., :, None, :, None]
    return _from_tiles(tiles, n, k).astype(dtype)


def quantize_per_channel(w: ArrayLike, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """One scale per slice along `axis` (default: per output row of [..., N, K]).

    Returns (w_fp8 float8_e4m3fn, scale float32 with `axis` kept as size 1, e.g. [..., N, 1])."""
    w = jnp.asarray(w, jnp.float32)
    scale = _scale_from_amax(jnp.max(_finite_abs(w), axis=axis, keepdims=True))
    return _to_e4m3(divide(w, scale)), scale


def quantize_groups(x: ArrayLike, group: int = 128, exact_scale: bool = True,
                    amax: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    """One scale per row and `group` consecutive columns of [..., M, K] (the dynamic activation
    scheme of the FP8 checkpoints: per token and 128 channels). K must be a multiple of group.

    Returns (x_fp8 float8_e4m3fn [..., M, K], scale float32 [..., M, K / group]). It runs on the
    serving path, so the codes divide plainly (no `exact.divide` barrier, which would keep XLA
    from fusing it into the pass that produced x). exact_scale=False divides the scale plainly
    too: its barrier costs a decode step two more small kernels per rounding on GPUs, and XLA's
    reciprocal can move the scale's last bit. amax: each group's max |x| over finite values
    [..., M, K / group], where the caller has it from a compact form of x (NVFP4 codes and block
    scales): x is then read once, by the pass that writes the codes."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] % group:
        raise ValueError(f"quantize_groups needs a last axis that is a multiple of {group}, got shape {x.shape}")
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    if amax is None:
        amax = jnp.max(_finite_abs(tiles), axis=-1)
    scale = _scale_from_amax(jnp.asarray(amax, jnp.float32), exact_scale)
    return _to_e4m3(tiles / scale[..., None]).reshape(x.shape), scale


def dequantize_groups(x_fp8: ArrayLike, scale: ArrayLike, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Inverse of `quantize_groups`, as `dtype`."""
    x = jnp.asarray(x_fp8).astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    group = x.shape[-1] // scale.shape[-1]
    tiles = x.reshape(*x.shape[:-1], scale.shape[-1], group) * scale[..., None]
    return tiles.reshape(x.shape).astype(dtype)


def dequantize_per_channel(w_fp8: ArrayLike, scale: ArrayLike,
                           dtype: DTypeLike = jnp.float32) -> jax.Array:
    """f32(w_fp8) * scale (broadcast), as `dtype`."""
    w = jnp.asarray(w_fp8).astype(jnp.float32)
    return (w * jnp.asarray(scale, jnp.float32)).astype(dtype)


def requantize_blockwise_to_per_channel(w_fp8: ArrayLike, scale_inv: ArrayLike,
                                        block: tuple[int, int] = DEFAULT_BLOCK
                                        ) -> tuple[jax.Array, jax.Array]:
    """Blockwise FP8 -> per-row FP8 ([..., N, K], scale [..., N, 1]).

    Rounds a second time; its error against the blockwise values obeys the per-channel bound."""
    return quantize_per_channel(dequantize_blockwise(w_fp8, scale_inv, jnp.float32, block), axis=-1)
