"""ModelRunner: the jitted step (forward + sampling) on the mesh, one compile per bucket."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from minimax_jax.engine.sampling import SamplingBatch, sample
from minimax_jax.model import MiniMaxM2, StepInput
from sharding.forward import sharded_forward
from sharding.mesh import Layout, make_mesh
from sharding.specs import KV_SPEC, replicate_kv_heads, shard_state, state_specs


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray          # [D*B] sampled token per slot
    logprobs: np.ndarray        # [D*B]
    top_ids: np.ndarray         # [D*B, 20]
    top_logprobs: np.ndarray    # [D*B, 20]


class ModelRunner:
    """Owns the sharded parameters and KV cache; runs one padded step at a time.

    The KV cache holds `pages_per_rank` pages for each dp rank; page ids in a step's page table
    are local to the slot's rank.
    """

    def __init__(self, model: MiniMaxM2, layout: Layout, pages_per_rank: int, page_size: int,
                 kv_dtype: Any = None, devices: list | None = None, seed: int = 0, moe_kernel: str = "auto",
                 max_slots: int = 1024):
        cfg = self.cfg = model.cfg
        layout.check(cfg, model.expert_format)
        self.layout = layout
        self.mesh = make_mesh(layout, devices)
        self.page_size = page_size
        self.pages_per_rank = pages_per_rank
        model.layers.experts.kernel = moe_kernel
        graphdef, state = nnx.split(model)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
            self.state = random_sharded_state(model, layout, self.mesh, seed)
        else:
            self.state = shard_state(state, layout, self.mesh, cfg.head_dim, cfg.num_kv_heads)
        self.forward = sharded_forward(cfg, graphdef, self.state, layout, self.mesh, combine_dtype=model.dtype)
        self.kv = self._empty_kv(kv_dtype or model.dtype)
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 5))
        self._compiled: dict = {}       # input shapes -> executable: one compile per bucket, and
                                        # an input placed unlike its executable fails loudly
        self._slots = NamedSharding(self.mesh, P("dp"))
        self._replicated = NamedSharding(self.mesh, P())
        # the last step's sampled tokens, on device, padded to a fixed length
        self.last_tokens = jax.device_put(np.zeros(max_slots, np.int32), self._replicated)

    @property
    def num_compiles(self) -> int:
        return len(self._compiled)

    def _empty_kv(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        cfg, layout = self.cfg, self.layout
        heads = cfg.num_kv_heads * layout.kv_head_replicas(cfg.num_kv_heads)
        shape = (cfg.num_layers, layout.dp * self.pages_per_rank, self.page_size, heads, cfg.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(self.mesh, KV_SPEC))
        return zeros(), zeros()

    def _step_impl(self, state, kv, step: StepInput, logit_index: jax.Array, sampling: SamplingBatch,
                   last_tokens: jax.Array, sources: jax.Array):
        # a decode slot whose input token the previous step sampled reads it here, on device
        first = jnp.where(sources >= 0, last_tokens[jnp.maximum(sources, 0)], step.tokens[:, 0])
        step = dataclasses.replace(step, tokens=step.tokens.at[:, 0].set(first))
        logits, kv, _ = self.forward(state, kv, step, logit_index)
        out = sample(logits, sampling)
        last = jnp.zeros_like(last_tokens).at[:out[0].shape[0]].set(out[0])
        return kv, jax.lax.with_sharding_constraint(last, self._replicated), out

    def launch(self, step: StepInput, logit_index: np.ndarray, sampling: SamplingBatch,
               sources: np.ndarray | None = None) -> tuple[jax.Array, ...]:
        """Dispatches one step without waiting for it; `read` gives its results."""
        put = lambda x: jax.device_put(np.asarray(x), self._slots)
        sources = np.full(step.tokens.shape[0], -1, np.int32) if sources is None else sources
        args = (self.state, self.kv, jax.tree.map(put, step), put(logit_index), jax.tree.map(put, sampling),
                self.last_tokens, put(sources))
        key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[2:]))
        if key not in self._compiled:
            self._compiled[key] = self._step.lower(*args).compile()
        self.kv, self.last_tokens, out = self._compiled[key](*args)
        return out

    @staticmethod
    def read(out: tuple[jax.Array, ...]) -> StepOutput:
        return StepOutput(*(np.asarray(x) for x in out))

    def run(self, step: StepInput, logit_index: np.ndarray, sampling: SamplingBatch) -> StepOutput:
        return self.read(self.launch(step, logit_index, sampling))


def random_sharded_state(abstract: MiniMaxM2, layout: Layout, mesh, seed: int) -> nnx.State:
    """Random weights of the model's exact shapes, drawn on the devices already sharded (never
    materialised on one host), for benchmarks at full size."""
    cfg = abstract.cfg

    def init():
        model = MiniMaxM2(cfg, dtype=abstract.dtype, expert_format=abstract.expert_format, rngs=nnx.Rngs(seed))
        return replicate_kv_heads(nnx.state(model), cfg.head_dim, layout.kv_head_replicas(cfg.num_kv_heads))

    specs = state_specs(jax.eval_shape(init), layout)
    return jax.jit(init, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))()
