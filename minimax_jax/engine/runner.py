"""ModelRunner: the jitted step (forward + sampling) over the KV cache, one compile per bucket."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.engine.sampling import SamplingBatch, sample
from minimax_jax.model import MiniMaxM2, StepInput, init_kv_cache


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray          # [B] sampled token per slot
    logprobs: np.ndarray        # [B]
    top_ids: np.ndarray         # [B, 20]
    top_logprobs: np.ndarray    # [B, 20]


class ModelRunner:
    """Owns the parameters and the KV cache; runs one padded step at a time."""

    def __init__(self, model: MiniMaxM2, num_pages: int, page_size: int, kv_dtype: Any = None):
        self.cfg = model.cfg
        self.page_size = page_size
        self.num_pages = num_pages
        self.graphdef, self.params = nnx.split(model)
        self.kv = init_kv_cache(model.cfg, num_pages, page_size, kv_dtype or model.dtype)
        self.num_compiles = 0
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))

    def _step_impl(self, params, kv, step: StepInput, logit_index: jax.Array, sampling: SamplingBatch):
        self.num_compiles += 1          # runs once per trace, i.e. per compiled bucket
        model = nnx.merge(self.graphdef, params)
        logits, kv = model(step, kv, logit_index)
        tokens, logprobs, top_ids, top_values = sample(logits, sampling)
        return kv, (tokens, logprobs, top_ids, top_values)

    def run(self, step: StepInput, logit_index: np.ndarray, sampling: SamplingBatch) -> StepOutput:
        self.kv, out = self._step(self.params, self.kv, step, jnp.asarray(logit_index), sampling)
        return StepOutput(*(np.asarray(x) for x in out))
