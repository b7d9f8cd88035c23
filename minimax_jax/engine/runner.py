"""ModelRunner: the jitted step (forward + sampling) on the mesh, one compile per bucket."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from minimax_jax.engine.sampling import SamplingBatch, sample, top_k_carrying
from minimax_jax.model import MiniMaxM2, StepInput
from minimax_jax.ops import attention as attention_ops, decode_attention
from sharding.forward import logits_split_over_vocab, sharded_forward, vocab_top_k
from sharding.mesh import Layout, make_mesh
from sharding.specs import KV_SPEC, replicate_kv_heads, shard_state, state_specs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray          # [D*B] sampled token per slot
    logprobs: np.ndarray        # [D*B]
    top_ids: np.ndarray         # [D*B, 20], or [D*B, 0] when no request asked
    top_logprobs: np.ndarray    # [D*B, 20], or [D*B, 0]
    # each position's score of the prompt's next token, where the step was given targets
    prompt_logprobs: np.ndarray | None = None       # [D*B, T]
    prompt_top_ids: np.ndarray | None = None        # [D*B, T, 20], or [D*B, T, 0]
    prompt_top_logprobs: np.ndarray | None = None   # likewise


# XLA's command buffers for every kind of thunk (its defaults leave out collectives, loops and
# conditionals). On 4x H200 at full depth they made one request's decode 9% faster (W3: 10.64
# against 11.72 ms per token) and W1 0.9% slower (docs/benchmarks.md, runs BX and BY, set for the
# whole process), hence only for decode steps of few slots (`cuda_graph_max_bs`).
COMMAND_BUFFERS_EVERYWHERE = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES,CONDITIONAL,WHILE",
    "xla_gpu_graph_min_graph_size": 1,
}


class ModelRunner:
    """Owns the sharded parameters and KV cache; runs one padded step at a time.

    The KV cache holds `pages_per_rank` pages for each dp rank; page ids in a step's page table
    are local to the slot's rank.
    """

    def __init__(self, model: MiniMaxM2, layout: Layout, pages_per_rank: int | None, page_size: int,
                 kv_dtype: Any = None, devices: list | None = None, seed: int = 0, moe_kernel: str = "auto",
                 max_slots: int = 1024, mem_fraction_static: float = 0.85, max_pages_per_rank: int | None = None,
                 attention_backend: str = "auto", decode_attention_backend: str = "auto",
                 cuda_graph_max_bs: int = 0):
        """pages_per_rank None: as many pages as fit in `mem_fraction_static` of the device
        memory left to JAX once the weights are placed (at most `max_pages_per_rank`)."""
        cfg = self.cfg = model.cfg
        layout.check(cfg, model.expert_format)
        self.layout = layout
        self.mesh = make_mesh(layout, devices)
        self.page_size = page_size
        self.pages_per_rank = pages_per_rank
        model.layers.experts.kernel = moe_kernel
        model.layers.attn.backend = attention_backend
        model.layers.attn.decode_backend = decode_attention_backend
        graphdef, state = nnx.split(model)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
            self.state = random_sharded_state(model, layout, self.mesh, seed)
        else:
            self.state = shard_state(state, layout, self.mesh, cfg.head_dim, cfg.num_kv_heads)
        self.forward = sharded_forward(cfg, graphdef, self.state, layout, self.mesh, combine_dtype=model.dtype)
        self._top_k = vocab_top_k(self.mesh, top_k_carrying)
        kv_dtype = kv_dtype or model.dtype
        if pages_per_rank is None:
            fitting = self._pages_that_fit(kv_dtype, mem_fraction_static)
            pages = fitting if max_pages_per_rank is None else min(fitting, max_pages_per_rank)
            self.pages_per_rank = self._pages_the_decode_kernel_reads(pages, fitting, kv_dtype)
        self._check_decode_kernel(kv_dtype, decode_attention_backend, model.dtype)
        self.kv = self._empty_kv(kv_dtype)
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 3), static_argnums=(4,))
        # decode steps of at most this many slots per dp rank run as command buffers (CUDA graphs)
        self.cuda_graph_max_bs = cuda_graph_max_bs
        self._graph_step = jax.jit(self._step_impl, donate_argnums=(1, 3), static_argnums=(4,),
                                   compiler_options=COMMAND_BUFFERS_EVERYWHERE)
        self._compiled: dict = {}       # input shapes -> executable: one compile per bucket, and
                                        # an input placed unlike its executable fails loudly
        self._slots = NamedSharding(self.mesh, P("dp"))
        self._replicated = NamedSharding(self.mesh, P())
        # the last step's sampled tokens, on device, padded to a fixed length
        self.last_tokens = jax.device_put(np.zeros(max_slots, np.int32), self._replicated)

    @property
    def num_compiles(self) -> int:
        return len(self._compiled)

    def _kv_shape(self, pages_per_rank: int) -> tuple[int, ...]:
        cfg, layout = self.cfg, self.layout
        heads = cfg.num_kv_heads * layout.kv_head_replicas(cfg.num_kv_heads)
        return (cfg.num_layers, layout.dp * pages_per_rank, self.page_size, heads, cfg.head_dim)

    def _empty_kv(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        shape = self._kv_shape(self.pages_per_rank)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(self.mesh, KV_SPEC))
        return zeros(), zeros()

    def _kv_shard(self, pages_per_rank: int, dtype: Any) -> jax.ShapeDtypeStruct:
        """One device's k (or v) cache."""
        shape = NamedSharding(self.mesh, KV_SPEC).shard_shape(self._kv_shape(pages_per_rank))
        return jax.ShapeDtypeStruct(shape, dtype)

    def _pages_that_fit(self, dtype: Any, fraction: float) -> int:
        one_page = self._kv_shard(1, dtype)         # k and v of one page per rank, as one device holds it
        per_page = 2 * int(np.prod(one_page.shape)) * jnp.dtype(dtype).itemsize
        return kv_pages_that_fit([d.memory_stats() for d in self.mesh.devices.flat], fraction, per_page, None)

    def _pages_the_decode_kernel_reads(self, pages: int, fitting: int, dtype: Any) -> int:
        chosen = pages_the_decode_kernel_reads(pages, fitting, lambda n: self._kv_shard(n, dtype))
        if chosen != pages:
            log.info("KV cache: %d pages per dp rank instead of %d, so the decode attention kernel reads it",
                     chosen, pages)
        return chosen

    def _check_decode_kernel(self, dtype: Any, backend: str, model_dtype: Any) -> None:
        """Says so where the decode attention kernel was chosen but cannot read this cache (each
        decode step then takes the XLA reference, about twice its time)."""
        cache = self._kv_shard(self.pages_per_rank, dtype)
        if attention_ops.resolve_decode_backend(backend, model_dtype) == "pallas" and not decode_attention.supports(cache):
            log.warning("the decode attention kernel cannot read a KV cache of %s %s per device; decode steps "
                        "take the XLA reference (a cache of another size avoids this: --max-running-requests, "
                        "--max-total-tokens or --mem-fraction-static)", cache.shape, jnp.dtype(dtype).name)

    def _step_impl(self, state, kv, packed: jax.Array, last_tokens: jax.Array, layout: "PackedLayout"):
        step, logit_index, sampling, sources, targets = layout.unpack(packed)
        # a decode slot whose input token the previous step sampled reads it here, on device
        first = jnp.where(sources >= 0, last_tokens[jnp.maximum(sources, 0)], step.tokens[:, 0])
        step = dataclasses.replace(step, tokens=step.tokens.at[:, 0].set(first))
        logits, kv, _, *scored = self.forward(state, kv, step, logit_index, targets, sampling.top_logprobs)
        split = logits_split_over_vocab(self.layout, step.tokens.shape[0] // self.layout.dp)
        select = self._top_k if split else top_k_carrying
        out = (*sample(logits, sampling, select_top_k=select), *(scored[0] if scored else ()))
        last = jnp.zeros_like(last_tokens).at[:out[0].shape[0]].set(out[0])
        return kv, jax.lax.with_sharding_constraint(last, self._replicated), out

    def launch(self, step: StepInput, logit_index: np.ndarray, sampling: SamplingBatch,
               sources: np.ndarray | None = None, targets: np.ndarray | None = None) -> tuple[jax.Array, ...]:
        """Dispatches one step without waiting for it; `read` gives its results. targets [D*B, T]:
        the token each position scores (prompt logprobs; -1 none), None when no request asks."""
        packed, executable = self._prepare(step, logit_index, sampling, sources, targets)
        self.kv, self.last_tokens, out = executable(self.state, self.kv, packed, self.last_tokens)
        return out

    def compile(self, step: StepInput, logit_index: np.ndarray, sampling: SamplingBatch,
                sources: np.ndarray | None = None, targets: np.ndarray | None = None) -> None:
        """Compiles the executable that `launch` would run for inputs of these shapes and static
        fields, without running it (the values do not matter)."""
        self._prepare(step, logit_index, sampling, sources, targets)

    def _prepare(self, step, logit_index, sampling, sources, targets=None):
        sources = np.full(step.tokens.shape[0], -1, np.int32) if sources is None else sources
        packed, layout = PackedLayout.pack((step, logit_index, sampling, sources, targets))
        packed = jax.device_put(packed, self._slots)       # one transfer for all step inputs
        key = (packed.shape, layout)
        if key not in self._compiled:
            slots_per_rank = step.tokens.shape[0] // self.layout.dp
            graphed = step.tokens.shape[1] == 1 and slots_per_rank <= self.cuda_graph_max_bs
            step_fn = self._graph_step if graphed else self._step
            self._compiled[key] = step_fn.lower(self.state, self.kv, packed, self.last_tokens, layout).compile()
        return packed, self._compiled[key]

    @staticmethod
    def read(out: tuple[jax.Array, ...]) -> StepOutput:
        return StepOutput(*(np.asarray(x) for x in out))

    def run(self, step: StepInput, logit_index: np.ndarray, sampling: SamplingBatch,
            targets: np.ndarray | None = None) -> StepOutput:
        return self.read(self.launch(step, logit_index, sampling, targets=targets))


def random_sharded_state(abstract: MiniMaxM2, layout: Layout, mesh, seed: int) -> nnx.State:
    """Random weights of the model's exact shapes, drawn on the devices already sharded (never
    materialised on one host), for benchmarks at full size."""
    cfg = abstract.cfg

    def init():
        model = MiniMaxM2(cfg, dtype=abstract.dtype, expert_format=abstract.expert_format, rngs=nnx.Rngs(seed))
        return replicate_kv_heads(nnx.state(model), cfg.head_dim, layout.kv_head_replicas(cfg.num_kv_heads),
                                  cfg.num_kv_heads)

    specs = state_specs(jax.eval_shape(init), layout)
    return jax.jit(init, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))()


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """How a step's small per-slot inputs sit side by side in one int32 [slots, columns] array,
    so that a step costs one host-to-device transfer instead of a dozen."""
    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str], ...]       # (shape, dtype) of each input

    @classmethod
    def pack(cls, tree: Any) -> tuple[np.ndarray, "PackedLayout"]:
        leaves, treedef = jax.tree.flatten(tree)
        arrays = [np.asarray(x) for x in leaves]
        slots = arrays[0].shape[0]
        columns = [_as_int32(a).reshape(slots, -1) for a in arrays]
        layout = cls(treedef, tuple((a.shape, str(a.dtype)) for a in arrays))
        return np.concatenate(columns, axis=1), layout

    def unpack(self, packed: jax.Array) -> Any:
        out, start = [], 0
        for shape, dtype in self.leaves:
            width = int(np.prod(shape[1:], dtype=np.int64))
            column = packed[:, start:start + width].reshape(shape)
            start += width
            if dtype == "bool":
                out.append(column != 0)
            elif np.dtype(dtype).kind == "f" or dtype == "uint32":
                out.append(jax.lax.bitcast_convert_type(column, jnp.dtype(dtype)))
            else:
                out.append(column.astype(dtype))
        return jax.tree.unflatten(self.treedef, out)


def _as_int32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(np.int32)
    if a.dtype.itemsize != 4:
        raise TypeError(f"cannot pack a {a.dtype} step input")
    return a.view(np.int32)


def pages_the_decode_kernel_reads(pages: int, fitting: int, shard: Callable[[int], jax.ShapeDtypeStruct]) -> int:
    """pages, or the fewest more (at most `fitting`) whose cache the decode attention kernel can
    read where it cannot read that of `pages`: an 8-bit cache of 2-4 GiB a device is read at
    wrapped offsets (`decode_attention.supports`), one just over 4 GiB is not. `shard`: one
    device's k cache at a number of pages per rank. The XLA reference that the engine falls back
    to took 33.2 against 25.7 ms a decode step at 256 requests on one H200 (docs/benchmarks.md,
    run CV)."""
    if decode_attention.supports(shard(pages)):
        return pages
    one_page = shard(1)
    grown = 2**32 // (math.prod(one_page.shape) * jnp.dtype(one_page.dtype).itemsize) + 1
    return grown if pages < grown <= fitting and decode_attention.supports(shard(grown)) else pages


def kv_pages_that_fit(stats: list[dict | None], fraction: float, bytes_per_page: int,
                      max_pages: int | None) -> int:
    """KV pages per dp rank that fit on every device in `fraction` of its memory limit, less what
    it holds now (the weights). `stats`: each device's allocator statistics (GPUs report them)."""
    if not stats or not all(stats) or any("bytes_limit" not in s for s in stats):
        raise ValueError("these devices report no memory statistics: give max_total_tokens "
                         "(--max-total-tokens) to size the KV cache")
    free = min(s["bytes_limit"] * fraction - s["bytes_in_use"] for s in stats)
    pages = int(free // bytes_per_page)
    if max_pages is not None:
        pages = min(pages, max_pages)
    if pages < 1:
        raise ValueError(f"no memory left for the KV cache: {free / 2**30:.2f} GiB free within "
                         f"mem_fraction_static={fraction} once the weights are placed")
    return pages
