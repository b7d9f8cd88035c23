"""One decode step's routing for a few tokens as two Pallas (Triton) kernels.

The router is small (fp32 [H, E], 3 MiB a layer for MiniMax-M2) but in XLA it is eight kernels
for one token: the layer's weights copied out of the weights stacked over layers, the row
doubled for a GEMM, a split-K GEMM and its sum, sigmoid and bias, a sort for the top-k, and the
gathers of the chosen scores; 17 us a layer on an H200 for one request (docs/benchmarks.md).
Here one kernel reads the layer's weights in place and writes partial logits per K split, and a
second sums them, applies the sigmoid and the correction bias, and picks the top k with their
renormalised scores.

For more tokens (a prefill step, a large decode batch) the logits stay XLA's GEMM and
`choose_many` does the rest in one kernel over blocks of rows: XLA's top-k of 8 among 256 is a
sort of every row, then gathers and sums, 73 us a layer for 8192 tokens in a DEP2 prefill step on
an H200 (docs/benchmarks.md, run GD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minimax_jax.ops import triton_common
from minimax_jax.ops.triton_common import whole_block

FEW_ROWS = triton_common.DOT_MIN_ROWS       # rows are padded to a Triton dot's smallest M
BLOCK_K = 128


def _choosable(num_experts: int, top_k: int) -> bool:
    """Whether `_choose` takes these: Triton's power-of-two blocks over the experts (at least a
    dot's 16) and the choices."""
    return (triton_common.power_of_two(num_experts) and triton_common.power_of_two(top_k)
            and num_experts >= triton_common.DOT_MIN_ROWS)


def supports(rows: int, hidden: int, num_experts: int, top_k: int) -> bool:
    """Whether `route_few` takes these shapes: at most FEW_ROWS tokens, H a multiple of BLOCK_K,
    and experts and choices `_choose` takes."""
    return rows <= FEW_ROWS and hidden % BLOCK_K == 0 and _choosable(num_experts, top_k)


def route_few(h: jax.Array, weight: jax.Array, bias: jax.Array, layer: jax.Array | int, valid: jax.Array,
              top_k: int, scaling: float, *, block_e: int = 16, interpret: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """`model.Router` for at most FEW_ROWS tokens: h [N, H]; weight [L, H, E] and bias [L, E]
    fp32, stacked over layers (this layer's read in place); valid [N]. Returns (ids [N, k] int32,
    the number of experts for invalid tokens; weights [N, k] fp32, 0 for invalid tokens). Ties
    go to the lower expert id, as `jax.lax.top_k` breaks them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    n, hidden = h.shape
    layers, _, experts = weight.shape
    if not supports(n, hidden, experts, top_k) or weight.shape[1] != hidden or bias.shape != (layers, experts):
        raise ValueError(f"route_few takes at most {FEW_ROWS} rows, H a multiple of {BLOCK_K}, and powers of two "
                         f"of at least 16 experts and of choices; got h {h.shape}, weight {weight.shape}, bias "
                         f"{bias.shape}, top_k {top_k}")
    # 8 splits of MiniMax-M2's 24 blocks: 128 programs over 16 experts each (4 splits, 64
    # programs, read the 3 MiB at half a TB/s)
    splits = next(s for s in (8, 4, 2, 1) if (hidden // BLOCK_K) % s == 0)
    given = 1 if n == 1 else FEW_ROWS       # one row fills the dot's 16 rows in the kernel
    rows = jnp.pad(h, ((0, given - n), (0, 0)))
    choosing = triton_common.next_power_of_two(n)       # rows the top-k kernel takes
    layer = jnp.asarray(layer, jnp.int32).reshape(1)

    def logits_kernel(layer_ref, x_ref, w_ref, o_ref):
        first = layer_ref[0] * hidden
        cols = pl.ds(pl.program_id(0) * block_e, block_e)

        def step(kb, acc):
            ks = pl.ds(pl.multiple_of(kb * BLOCK_K, BLOCK_K), BLOCK_K)
            wb = w_ref[pl.ds(first + kb * BLOCK_K, BLOCK_K), cols]
            xb = x_ref[:, ks].astype(jnp.float32)
            if given < FEW_ROWS:
                xb = jnp.broadcast_to(xb, (FEW_ROWS, BLOCK_K))
            return acc + pltriton.dot(xb, wb, allow_tf32=False)

        per_split = hidden // BLOCK_K // splits
        start = pl.program_id(1) * per_split
        o_ref[...] = jax.lax.fori_loop(start, start + per_split, step, jnp.zeros((FEW_ROWS, block_e), jnp.float32))

    partial = pl.pallas_call(
        logits_kernel, grid=(experts // block_e, splits),
        in_specs=[whole_block((1,)), whole_block((given, hidden)), whole_block((layers * hidden, experts))],
        out_specs=pl.BlockSpec((None, FEW_ROWS, block_e), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, FEW_ROWS, experts), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),    # Triton, not Mosaic
        interpret=interpret, name="router_logits",
    )(layer, rows, weight.reshape(layers * hidden, experts))

    def top_k_kernel(layer_ref, part_ref, bias_ref, valid_ref, ids_ref, w_ref):
        logits = part_ref[0]
        for s in range(1, splits):
            logits = logits + part_ref[s]
        ids_ref[...], w_ref[...] = _choose(logits, bias_ref[pl.ds(layer_ref[0], 1), :], valid_ref[...],
                                           top_k, scaling)

    # one warp: its 3 x top_k reductions in a row are shuffles within the warp, not round trips
    # through shared memory between warps (4 warps over 16 rows took 34 us on an H200)
    ids, weights = pl.pallas_call(
        top_k_kernel, grid=(1,),
        in_specs=[whole_block((1,)), whole_block((splits, choosing, experts)), whole_block((layers, experts)),
                  whole_block((choosing,))],
        out_specs=[whole_block((choosing, top_k))] * 2,
        out_shape=[jax.ShapeDtypeStruct((choosing, top_k), jnp.int32),
                   jax.ShapeDtypeStruct((choosing, top_k), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name="router_top_k",
    )(layer, partial, bias, jnp.pad(valid.astype(jnp.int32), (0, choosing - n)))
    return ids[:n], weights[:n]


def _choose(logits: jax.Array, bias: jax.Array, valid: jax.Array, top_k: int, scaling: float
            ) -> tuple[jax.Array, jax.Array]:
    """Inside a kernel: each row's top_k experts by sigmoid(logits) + bias (ties to the lower id),
    and their sigmoid scores renormalised to sum to `scaling`; rows not valid get the number of
    experts and weight 0. logits [R, E] fp32, bias [1, E], valid [R] int32."""
    rows, experts = logits.shape
    scores = 1.0 / (1.0 + jnp.exp(-logits))
    biased = scores + bias
    expert = jax.lax.broadcasted_iota(jnp.int32, (rows, experts), 1)
    column = jax.lax.broadcasted_iota(jnp.int32, (rows, top_k), 1)
    ids = jnp.zeros((rows, top_k), jnp.int32)
    chosen = jnp.zeros((rows, top_k), jnp.float32)
    for j in range(top_k):
        best = jnp.max(biased, axis=1)
        pick = jnp.min(jnp.where(biased == best[:, None], expert, experts), axis=1)
        hit = expert == pick[:, None]
        score = jnp.sum(jnp.where(hit, scores, 0.0), axis=1)
        ids = jnp.where(column == j, pick[:, None], ids)
        chosen = jnp.where(column == j, score[:, None], chosen)
        biased = jnp.where(hit, -jnp.inf, biased)
    chosen = chosen / jnp.sum(chosen, axis=1, keepdims=True) * scaling
    keep = valid != 0
    return jnp.where(keep[:, None], ids, experts), jnp.where(keep[:, None], chosen, 0.0)


# a program of one warp over 8 rows: its reductions stay shuffles within the warp. At 8192 tokens
# on an H200 7.2 us against 13.9-124 us for 16-64 rows on 1-8 warps, and 37 us for XLA's choice
# (benchmarks/router_probe.py --choice, docs/benchmarks.md run GI)
MANY_BLOCK_ROWS = 8
MANY_WARPS = 1


def supports_many(rows: int, num_experts: int, top_k: int) -> bool:
    """Whether `choose_many` takes these shapes: more rows than `route_few` takes, and experts and
    choices `_choose` takes."""
    return rows > FEW_ROWS and _choosable(num_experts, top_k)


def choose_many(logits: jax.Array, bias: jax.Array, layer: jax.Array | int, valid: jax.Array, top_k: int,
                scaling: float, *, block_rows: int = MANY_BLOCK_ROWS, num_warps: int = MANY_WARPS,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`model.Router`'s choice from its logits for many tokens, in one kernel over blocks of
    block_rows rows: logits [N, E] fp32, bias [L, E] stacked over layers (this layer's read
    in place), valid [N]. Returns what `route_few` returns."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    n, experts = logits.shape
    layers = bias.shape[0]
    if not supports_many(n, experts, top_k) or bias.shape != (layers, experts):
        raise ValueError(f"choose_many takes more than {FEW_ROWS} rows and powers of two of at least 16 experts "
                         f"and of choices; got logits {logits.shape}, bias {bias.shape}, top_k {top_k}")
    block = block_rows
    padded = -(-n // block) * block
    if padded != n:     # a decode batch's rows; the padding rows are not valid
        logits, valid = jnp.pad(logits, ((0, padded - n), (0, 0))), jnp.pad(valid, (0, padded - n))

    def kernel(layer_ref, logits_ref, bias_ref, valid_ref, ids_ref, w_ref):
        ids_ref[...], w_ref[...] = _choose(logits_ref[...], bias_ref[pl.ds(layer_ref[0], 1), :], valid_ref[...],
                                           top_k, scaling)

    rows = lambda width: pl.BlockSpec((block, width), lambda i: (i, 0))      # noqa: E731
    ids, weights = pl.pallas_call(
        kernel, grid=(padded // block,),
        in_specs=[whole_block((1,)), rows(experts), whole_block((layers, experts)),
                  pl.BlockSpec((block,), lambda i: (i,))],
        out_specs=[rows(top_k)] * 2,
        out_shape=[jax.ShapeDtypeStruct((padded, top_k), jnp.int32),
                   jax.ShapeDtypeStruct((padded, top_k), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="router_choose_many",
    )(jnp.asarray(layer, jnp.int32).reshape(1), logits, bias, valid.astype(jnp.int32))
    return ids[:n], weights[:n]
