"""Dense FP8 projections (W8A8) that read one layer of weights stacked over layers, in place.

The released FP8 checkpoint stores attention's projections as e4m3 blocks of 128 x 128 with one
fp32 scale each, and its activation scheme is dynamic: one scale per token and 128 channels, as
sglang runs it. On Hopper the projection is the experts' warp-specialised W8A8 kernel with one
group (`grouped_gemm_ws.aligned_gemm_w8a8`): both operands enter FP8 wgmmas, and the kernel
indexes the layer inside the stacked weights. A layer's slice of stacked weights handed to a
cuBLAS GEMM is copied out first by XLA (about 80 us a decode layer for bf16 attention on a DEP4
rank of W1, docs/benchmarks.md), which this avoids. Elsewhere the reference computes the same
numbers in fp32 on the layer's slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minimax_jax.ops import grouped_gemm_ws, moe
from quant import fp8

KERNELS = ("auto", "xla-w8a8", "mosaic-ws-w8a8")
BLOCK = grouped_gemm_ws.SCALE_BLOCK


def resolve_kernel(kernel: str) -> str:
    """"auto": the Mosaic kernel on Hopper GPUs, the XLA reference elsewhere."""
    if kernel not in KERNELS:
        raise ValueError(f"fp8 linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return "mosaic-ws-w8a8" if moe.on_hopper() else "xla-w8a8"
    return kernel


def fp8_linear(x: jax.Array, w: jax.Array, w_scale: jax.Array, layer: jax.Array | int, kernel: str = "auto",
               interpret=None) -> jax.Array:
    """x [M, K] @ dequantised w[layer].T -> [M, N] in x's dtype. w: [L, N, K] float8_e4m3fn
    (rows = output channels, as checkpoints store them); w_scale: [L, N/128, K/128] fp32. The
    rows are rounded to e4m3 with one scale per row and 128 columns (`quant.fp8.quantize_groups`)
    and the products summed in fp32."""
    layers, n, k = w.shape
    if x.shape[-1] != k or n % BLOCK or k % BLOCK or w_scale.shape != (layers, n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8_linear needs x [M, K], w [L, N, K] and w_scale [L, N/{BLOCK}, K/{BLOCK}] with N and K "
                         f"multiples of {BLOCK}; got x {x.shape}, w {w.shape}, w_scale {w_scale.shape}")
    if resolve_kernel(kernel) == "xla-w8a8":
        return reference(x, w[layer], w_scale[layer])
    m = x.shape[0]
    rows = -(-m // BLOCK) * BLOCK
    x_rows = jnp.pad(x, ((0, rows - m), (0, 0)))
    out = grouped_gemm_ws.aligned_gemm_w8a8(x_rows, jnp.zeros((rows // BLOCK,), jnp.int32), w[:, None],
                                            w_scale[:, None], layer=layer, interpret=interpret,
                                            **({"num_blocks": 2} if interpret else {}))
    return out[:m]


def reference(x: jax.Array, w: jax.Array, w_scale: jax.Array) -> jax.Array:
    """One layer's W8A8 product in fp32: w [N, K] e4m3, w_scale [N/128, K/128]. The rounded rows
    sit behind a barrier, since XLA's GPU compiler otherwise drops a round trip through FP8 as
    excess precision."""
    rounded = jax.lax.optimization_barrier(fp8.quantize_groups(x, BLOCK))
    w32 = fp8.dequantize_blockwise(w, w_scale)
    return jnp.dot(fp8.dequantize_groups(*rounded), w32.T, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32).astype(x.dtype)
