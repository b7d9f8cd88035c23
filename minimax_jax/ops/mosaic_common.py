"""What the Mosaic GPU kernels share: the SM count their persistent grids are sized by, experts
stacked over layers, the swizzled shared-memory layout of their tiles, and transposed wgmma
operands that also run under Pallas' GPU interpreter (whose wgmma takes no transposed operand)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sm_count() -> int:
    """Streaming multiprocessors of the first device (132 on an H100 or H200 where the device
    does not say), the unit of the kernels' persistent grid."""
    return getattr(jax.devices()[0], "core_count", 0) or 132


def stacked_layers(w: jax.Array, scale: jax.Array, layer: jax.Array | int | None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(w [L, ...], scale [L, ...], the layer's index as int32 [1]) for a kernel that reads its
    layer from the stacked arrays in place: a layer's slice handed to a kernel is copied whole
    by XLA first. Unstacked arrays (layer None) become one layer."""
    if layer is None:
        w, scale, layer = w[None], scale[None], 0
    return w, scale, jnp.asarray(layer, jnp.int32).reshape(1)


def swizzled(minor: int, dtype) -> tuple:
    """Shared-memory transforms of a tile whose rows hold `minor` elements of dtype: tiles of 8
    rows, swizzled as widely as a row allows (the layout TMA copies and wgmma operands take)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def transpose_scratch(shape, dtype, interpret) -> list:
    """Scratch for `transposed_operand`: needed under the interpreter only."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return [plgpu.SMEM(tuple(shape), dtype)] if interpret else []


def transposed_operand(ref, scratch, interpret):
    """A [R, K] shared-memory tile as a [K, R] wgmma operand: a transposed view, or under the
    interpreter a transposed copy in scratch (`transpose_scratch`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if interpret:
        scratch[0][...] = ref[...].T
        return scratch[0]
    return plgpu.transpose_ref(ref, (1, 0))
