"""Dense FP8 projections (W8A8) that read one layer of weights stacked over layers, in place;
and the same few-rows kernel for bf16 weights.

The released FP8 checkpoint stores attention's projections as e4m3 blocks of 128 x 128 with one
fp32 scale each, and its activation scheme is dynamic: one scale per token and 128 channels, as
sglang runs it. On Hopper the projection is the experts' warp-specialised W8A8 kernel with one
group (`grouped_gemm_ws.aligned_gemm_w8a8_quantized`, its rows rounded in one Triton pass by
`fp8_rows`): both operands enter FP8 wgmmas, and the kernel indexes the layer inside the
stacked weights; up to 16 rows (one request's decode) take a Triton
kernel that spreads them over more SMs (`few_rows`). A layer's slice of stacked weights handed to a
cuBLAS GEMM is copied out first by XLA (about 80 us a decode layer for bf16 attention on a DEP4
rank of W1, docs/benchmarks.md), which this avoids. Elsewhere the reference computes the same
numbers in fp32 on the layer's slice.

The few-rows kernel is weight-only (W8A16): its rows enter unrounded, as the experts' pair
kernel takes them (`ops.pair_experts`). Rounding them took three small XLA kernels per
projection ahead of it (a maximum per block, the scales, the codes), about 4 us each time on an
H200 for one request's decode, and rounding inside the kernel was slower still
(docs/benchmarks.md); the unrounded rows are the more exact product. Given no scales it reads
bf16 weights (a bf16 checkpoint's, or an NVFP4 one's attention), in place as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minimax_jax.ops import fp8_rows, grouped_gemm_ws, moe, triton_common
from minimax_jax.ops.triton_common import whole_block
from quant import fp8

KERNELS = ("auto", "xla-w8a8", "mosaic-ws-w8a8", "triton-w8a16")
BLOCK = grouped_gemm_ws.SCALE_BLOCK
FEW_ROWS = triton_common.DOT_MIN_ROWS      # rows up to which "auto" takes the Triton kernel
BF16_ROWS = 128     # rows up to which bf16 weights take the few-rows kernel (padded to a power of two)


def resolve_kernel(kernel: str, rows: int = FEW_ROWS + 1, w: jax.Array | None = None) -> str:
    """"auto": on Hopper GPUs the Triton kernel for at most FEW_ROWS rows (one request's decode;
    not for weights it would offset wrongly, `triton_common.offsets_wrap`) and the Mosaic kernel
    for more; the XLA reference elsewhere."""
    if kernel not in KERNELS:
        raise ValueError(f"fp8 linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        if not moe.on_hopper():
            return "xla-w8a8"
        few = rows <= FEW_ROWS and (w is None or not triton_common.offsets_wrap(w))
        return "triton-w8a16" if few else "mosaic-ws-w8a8"
    return kernel


def takes_few_rows(kernel: str, rows: int, w: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether `rows` rows against bf16 weights w [L, N, K] take `few_rows`: up to BF16_ROWS rows
    where the shapes allow it, kernel "triton-w8a16" anywhere (under the interpreter off GPUs) and
    "auto" on GPUs; not for weights it would offset wrongly. More rows take XLA's GEMM on a copy
    of the layer, which the kernel beat at every size measured on an H200: 32-128 rows of qkv and
    o on TP1 and TP4, e.g. TP1's qkv at 32 rows 21.0 against 48.7 us, at 128 rows 39.9 against
    51.0 us (docs/benchmarks.md, run FA); a 16-layer NVFP4 decode step of 64 slots took 15.6
    against 16.2-16.3 ms (runs FB, FC)."""
    if kernel not in KERNELS:
        raise ValueError(f"linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    _, n, k = w.shape
    fits = n % BLOCK == 0 and k % BLOCK == 0 and not triton_common.offsets_wrap(w) and rows <= BF16_ROWS
    return fits and (kernel == "triton-w8a16" or kernel == "auto" and jax.default_backend() == "gpu")


def fp8_linear(x: jax.Array, w: jax.Array, w_scale: jax.Array, layer: jax.Array | int, kernel: str = "auto",
               interpret=None) -> jax.Array:
    """x [M, K] @ dequantised w[layer].T -> [M, N] in x's dtype. w: [L, N, K] float8_e4m3fn
    (rows = output channels, as checkpoints store them); w_scale: [L, N/128, K/128] fp32. The
    rows are rounded to e4m3 with one scale per row and 128 columns (`quant.fp8.quantize_groups`;
    16-bit rows for the Mosaic kernel by `fp8_rows.quantize_groups`, the same numbers in one
    pass), except by the few-rows kernel ("triton-w8a16", `few_rows`), and the products summed
    in fp32.
    interpret (tests off GPUs): the Mosaic interpreter's parameters; the Triton kernel always
    runs under its interpreter off GPUs."""
    layers, n, k = w.shape
    if x.shape[-1] != k or n % BLOCK or k % BLOCK or w_scale.shape != (layers, n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8_linear needs x [M, K], w [L, N, K] and w_scale [L, N/{BLOCK}, K/{BLOCK}] with N and K "
                         f"multiples of {BLOCK}; got x {x.shape}, w {w.shape}, w_scale {w_scale.shape}")
    kernel = resolve_kernel(kernel, x.shape[0], w)
    if kernel == "xla-w8a8":
        return reference(x, w[layer], w_scale[layer])
    if kernel == "triton-w8a16":
        return few_rows(x, w, w_scale, layer, interpret=bool(interpret) or jax.default_backend() != "gpu")
    m = x.shape[0]
    rows = -(-m // BLOCK) * BLOCK
    x_rows = jnp.pad(x, ((0, rows - m), (0, 0)))
    # 16-bit rows rounded in one pass (XLA took two kernels), to the same numbers
    rounded = (fp8_rows.quantize_groups(x_rows, interpret=bool(interpret)) if fp8_rows.supports(x_rows)
               else fp8.quantize_groups(x_rows, BLOCK))
    out = grouped_gemm_ws.aligned_gemm_w8a8_quantized(*rounded, jnp.zeros((rows // BLOCK,), jnp.int32),
                                                      w[:, None], w_scale[:, None], layer=layer, out_dtype=x.dtype,
                                                      interpret=interpret, **({"num_blocks": 2} if interpret else {}))
    return out[:m]


def few_rows(x: jax.Array, w: jax.Array, w_scale: jax.Array | None, layer: jax.Array | int, *,
             block_n: int | None = None, splits: int | None = None, num_warps: int | None = None,
             num_stages: int | None = None, partial_sums: bool = False, interpret: bool = False) -> jax.Array:
    """`fp8_linear` for at most 16 rows as a Pallas (Triton) kernel, weight-only: one program per
    block_n output channels, so a decode step's few rows spread the weight reads over the SMs (the
    Mosaic kernel's 128 x 128 tiles are N / 128 programs: 24-32 of an H200's 132 SMs for one
    request's projections on TP2). Each program walks K in the 128-wide scale blocks: FP8 weights
    widen exactly to bf16 (fp32 for other rows), their dot with the rows sums in fp32 and takes the
    block's scale. One row takes no dot: its products with the weights widened to fp32 are added
    per column on the CUDA cores and summed along K once at the end (a dot needs 16 rows, and FP8
    widens to bf16 in several instructions where fp16 and fp32 take one or two; on an H200 one
    request's qkv and o took 10.1 and 8.2 us a layer with the rows rounded to FP8 and widened to
    fp16, 10.1 and 13.0 us summed along K every block, 9.4 and 10.2 us summed once,
    docs/benchmarks.md); 2-16 rows are padded by XLA, which fuses the padding into the pass that
    makes them. The layer's first weight row is found inside the kernel. splits: programs over K
    per block of channels, their fp32 partial sums added after the kernel (more loads in flight per
    SM); None: `few_rows_splits`. partial_sums: return the fp32 partial sums [splits, rows,
    N] as the kernel wrote them, rows 1 for one row and 16 for more (a kernel that reads them next
    adds them itself, `ops.attention_inputs`). w_scale None: w holds bf16 weights, used as they are,
    and up to BF16_ROWS rows are taken, padded to a power of two. block_n None: 32 channels a
    program for up to 16 rows, 64 for up to 64, 128 for more (each program reads the rows whole
    every step); num_warps None: 4, 8 where a program's products exceed 64 x 64; num_stages None:
    4, 3 for more than 64 rows (4 stages of 128 rows and 128 channels ask 256 KiB of shared
    memory, more than an H200's 227: the kernel failed to compile there)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    layers, n, _ = w.shape
    out_rows = 1 if m == 1 else max(FEW_ROWS, triton_common.next_power_of_two(m))
    block_n = block_n or (32 if out_rows <= FEW_ROWS else 64 if out_rows <= 64 else 128)
    num_warps = num_warps or (4 if out_rows * block_n <= 64 * 64 else 8)
    num_stages = num_stages or (4 if out_rows <= 64 else 3)
    max_rows = FEW_ROWS if w_scale is not None else BF16_ROWS
    splits = splits or few_rows_splits(k // BLOCK, n // block_n)
    if m > max_rows or n % block_n or BLOCK % block_n or (k // BLOCK) % splits or triton_common.offsets_wrap(w):
        raise ValueError(f"few_rows takes at most {max_rows} rows, block_n dividing {BLOCK} and N, splits dividing "
                         f"K/{BLOCK}, and weights of at most 2**31 entries or over 4 GiB; got x {x.shape}, w {w.shape}, "
                         f"block_n {block_n}, splits {splits}")
    compute = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32      # e4m3 widens to either exactly
    rows = x.astype(compute)
    if m > 1:
        rows = jnp.pad(rows, ((0, out_rows - m), (0, 0)))
    per_split = k // BLOCK // splits

    scaled = w_scale is not None

    def kernel(layer_ref, x_ref, w_ref, *refs):
        s_ref, o_ref = refs if scaled else (None, refs[0])
        first = layer_ref[0] * n + pl.program_id(0) * block_n       # this layer's rows in the flat weights
        scale_row = first // BLOCK
        scale = (lambda kb: s_ref[scale_row, kb]) if scaled else (lambda kb: 1.0)  # noqa: E731
        start = pl.program_id(1) * per_split
        if m == 1:      # products in fp32 on the CUDA cores, summed along K once at the end
            def row_step(kb, total):
                cols = pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)
                wb = w_ref[pl.ds(first, block_n), cols].astype(jnp.float32)
                xb = x_ref[0, cols].astype(jnp.float32) * scale(kb)
                return triton_common.fma(wb, xb[None, :], total, ptx=not interpret)

            total = jax.lax.fori_loop(start, start + per_split, row_step, jnp.zeros((block_n, BLOCK), jnp.float32))
            o_ref[...] = jnp.sum(total, axis=1)[None, :].astype(o_ref.dtype)
            return

        def step(kb, acc):
            cols = pl.ds(pl.multiple_of(kb * BLOCK, BLOCK), BLOCK)
            wb = w_ref[pl.ds(first, block_n), cols].astype(compute)
            part = pltriton.dot(x_ref[:, cols], wb.T, allow_tf32=False if compute == jnp.float32 else None)
            return acc + part.astype(jnp.float32) * scale(kb)

        acc = jax.lax.fori_loop(start, start + per_split, step, jnp.zeros((out_rows, block_n), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    scales = [w_scale.reshape(layers * n // BLOCK, k // BLOCK)] if scaled else []
    out = pl.pallas_call(
        kernel, grid=(n // block_n, splits),
        in_specs=[whole_block((1,)), whole_block(rows.shape), whole_block((layers * n, k))]
                 + [whole_block(a.shape) for a in scales],
        out_specs=pl.BlockSpec((None, out_rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, out_rows, n),
                                       x.dtype if splits == 1 and not partial_sums else jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="fp8_linear_few_rows" if scaled else "bf16_linear_few_rows",
    )(jnp.asarray(layer, jnp.int32).reshape(1), rows, w.reshape(layers * n, k), *scales)
    if partial_sums:
        return out
    return out.sum(axis=0)[:m].astype(x.dtype)


def few_rows_splits(k_blocks: int, column_blocks: int, programs: int = 1024) -> int:
    """Programs over K for `few_rows`: `triton_common.k_splits`, or 8 where that leaves fewer than
    `programs` programs and 8 divides K's blocks. One row on an H200 (benchmarks/fp8_linear_probe.py,
    docs/benchmarks.md): o on TP1 (96 blocks of channels) 11.1 -> 8.5 us with 8, TP2's qkv and o
    7.4 -> 6.8 and 6.9 -> 5.8, TP4's qkv 6.4 -> 5.1; TP1's qkv (256 blocks) 10.4 with 4, 10.8 with 8."""
    splits = triton_common.k_splits(k_blocks)
    if column_blocks * splits < programs and k_blocks % 8 == 0:
        return 8
    return splits


def reference(x: jax.Array, w: jax.Array, w_scale: jax.Array, round_rows: bool = True) -> jax.Array:
    """One layer's W8A8 product in fp32: w [N, K] e4m3, w_scale [N/128, K/128]. The rounded rows
    sit behind a barrier, since XLA's GPU compiler otherwise drops a round trip through FP8 as
    excess precision. round_rows=False: the weight-only product (`few_rows`)."""
    rows = x.astype(jnp.float32)
    if round_rows:
        rows = fp8.dequantize_groups(*jax.lax.optimization_barrier(fp8.quantize_groups(x, BLOCK)))
    w32 = fp8.dequantize_blockwise(w, w_scale)
    return jnp.dot(rows, w32.T, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32).astype(x.dtype)
