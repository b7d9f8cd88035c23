"""The model's forward step as one shard_map program over the mesh."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from minimax_jax.config import ModelConfig
from minimax_jax.model import StepInput
from sharding.collectives import MeshComm
from sharding.mesh import EXPERT_AXES, Layout
from sharding.specs import KV_SPEC, STEP_SPEC, state_specs


def sharded_forward(cfg: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, layout: Layout,
                    mesh: Mesh, combine_dtype: Any) -> Callable:
    """forward(state, kv, step, logit_index) -> (logits [D*B, V] split over dp and, from
    VOCAB_SPLIT_MIN_SLOTS slots a rank, along the vocabulary over tp, kv, routed-token counts
    [devices, layers, experts + 1]); with targets [D*B, T] (and top, static) a fourth output,
    the prompt positions' scores of `model.score_targets`.

    Step inputs stack every dp rank's B slots along the first axis; `state` only gives the tree
    structure for the parameter specs."""
    fused = MeshComm(layout, cfg.num_kv_heads, combine_dtype)
    replicated = MeshComm(dataclasses.replace(layout, ar_fusion=False), cfg.num_kv_heads, combine_dtype)
    step_specs = StepInput(tokens=STEP_SPEC, positions=STEP_SPEC, valid=STEP_SPEC, page_table=STEP_SPEC)
    param_specs = state_specs(state, layout)

    def local(state, kv, step, logit_index, targets=None, top=0, split=False):
        # The scattered residual needs the rank's tokens to divide over tp; a step that does not
        # (one decode token on TP4) keeps it replicated: padding it to tp rows would route and
        # compute the padding too, and AR fusion's two collectives cost more than one all-reduce
        # at a few tokens anyway.
        comm = fused if step.tokens.size % layout.tp == 0 else replicated
        model = nnx.merge(graphdef, state)
        logits, kv, counts, *scored = model(step, kv, logit_index, comm, targets, top)
        if not split:
            logits = comm.gather_logits(logits)
        if not comm.scatter and layout.tp > 1:      # every tp rank routed the same tokens
            counts = jnp.where(jax.lax.axis_index("tp") == 0, counts, 0)
        return (logits, kv, counts[None], *scored)

    def forward(state, kv, step, logit_index, targets=None, top=0):
        specs = dataclasses.replace(step_specs, fresh=step.fresh)     # the static field is part of the tree
        in_specs = (param_specs, (KV_SPEC, KV_SPEC), specs, P("dp"))
        split = logits_split_over_vocab(layout, step.tokens.shape[0] // layout.dp)
        out_specs = (P("dp", "tp") if split else P("dp"), (KV_SPEC, KV_SPEC), P(EXPERT_AXES))
        if targets is None:
            return jax.shard_map(functools.partial(local, split=split), mesh=mesh, in_specs=in_specs,
                                 out_specs=out_specs, check_vma=False)(state, kv, step, logit_index)
        scoring = lambda *args: local(*args, top=top, split=split)  # noqa: E731
        return jax.shard_map(scoring, mesh=mesh, in_specs=(*in_specs, P("dp")),
                             out_specs=(*out_specs, (P("dp"),) * 3),
                             check_vma=False)(state, kv, step, logit_index, targets)

    return forward


# Slots per dp rank from which a step's logits leave split over the vocabulary as the LM head
# made them (the sampler outside then partitions its reductions over tp, `vocab_top_k`):
# gathered they are [slots, vocabulary] fp32 on every device, 1210 x 200064 (about 1 GB, 2.8 ms
# of collectives) in W1's TP2 decode step. A few rows gather cheaply, and for one request on
# TP2 the split sampler's small collectives measured 6.93-6.95 against 6.71-6.88 ms a token
# (docs/benchmarks.md, run FZ: within the spread of calls, so unproven either way); the
# crossover between 1 and 1210 slots is not measured, 16 is a guess on the side of the old path.
VOCAB_SPLIT_MIN_SLOTS = 16


def logits_split_over_vocab(layout: Layout, slots_per_rank: int) -> bool:
    """Whether `sharded_forward` hands a step of this many slots a dp rank its logits split over
    the vocabulary (the runner then samples with `vocab_top_k`)."""
    return layout.tp > 1 and slots_per_rank >= VOCAB_SPLIT_MIN_SLOTS


def vocab_top_k(mesh: Mesh, whole: Callable) -> Callable:
    """`sampling.top_k_carrying` for logits [D*B, V] split over ("dp", "tp") as `sharded_forward`
    gives them: each device takes the top k of its part of the vocabulary (and the carried
    arrays there), and only those k x tp candidates a row are gathered for the final top k.
    Exact, ties included: the parts stand in vocabulary order and top_k keeps equal values in
    the order it finds them. `whole` (top_k_carrying) serves where a part holds fewer than k."""
    split, parts = P("dp", "tp"), mesh.shape["tp"]

    def local(x, *carried, k: int):
        values, ids = jax.lax.top_k(x, k)
        taken = [jnp.take_along_axis(c, ids, axis=-1) for c in carried]
        return (values, ids + jax.lax.axis_index("tp") * x.shape[-1], *taken)

    def top_k(x: jax.Array, k: int, *carried: jax.Array):
        if parts == 1 or k > x.shape[-1] // parts:
            return whole(x, k, *carried)
        n = 1 + len(carried)
        values, *rest = jax.shard_map(functools.partial(local, k=k), mesh=mesh, in_specs=(split,) * n,
                                      out_specs=(split,) * (n + 1), check_vma=False)(x, *carried)
        values, pick = jax.lax.top_k(values, k)
        return (values, *(jnp.take_along_axis(a, pick, axis=-1) for a in rest))

    return top_k
