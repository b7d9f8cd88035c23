"""Sampling parameters (sglang's names) and the on-device sampler.

Each request draws from its own key, `fold_in(PRNGKey(seed), position)`, so a seeded request
samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names the field."""


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs_num: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None     # token id -> added to its logit before the draw

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if d.get("logit_bias"):         # JSON keys are strings (OpenAI's and sglang's form)
            try:
                d["logit_bias"] = {int(t): float(b) for t, b in d["logit_bias"].items()}
            except (TypeError, ValueError, AttributeError):
                raise SamplingParamsError("logit_bias must map token ids to numbers") from None
        params = cls(**{k: v for k, v in d.items() if v is not None})
        params.validate()
        return params

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.top_logprobs_num < 0:
            raise SamplingParamsError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")
        for token, bias in (self.logit_bias or {}).items():
            if token < 0 or not -100 <= bias <= 100:
                raise SamplingParamsError(f"logit_bias takes token ids >= 0 and biases in [-100, 100], "
                                          f"got {token}: {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-slot sampling parameters of one step, as device arrays [B]."""
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    seed: jax.Array
    position: jax.Array            # position of the sampled token: folds into the key
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    penalized_ids: jax.Array       # [B, W] output tokens so far of slots with a penalty, -1 padded
    bias_ids: jax.Array            # [B, W2] token ids whose logits a slot biases, -1 padded
    bias_values: jax.Array         # [B, W2] what is added to them
    top_logprobs: int = dataclasses.field(default=0, metadata=dict(static=True))   # 0 or TOP_LOGPROBS_MAX
    # Known on the host, so the step needs no device-side branch: on GPUs a conditional copies
    # its predicate to the host and blocks the launching thread until the device reaches it.
    all_greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # whether a sampled slot's filters might keep tokens beyond the CANDIDATES most likely (no
    # top-k within them bounds them): only then does the draw check, and may sort the vocabulary
    may_exceed_candidates: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def uses_penalties(self) -> bool:
        return self.penalized_ids.shape[1] > 0

    @classmethod
    def build(cls, params: list[SamplingParams | None], seeds: list[int], positions: list[int],
              size: int, outputs: list[list[int]] | None = None) -> "SamplingBatch":
        """Arrays of `size` slots; empty slots are greedy. outputs: each slot's output tokens so
        far, needed only by the penalties (width 0 when no slot has one)."""
        def column(get, default, dtype):
            values = [get(p) if p is not None else default for p in params]
            return np.asarray(values + [default] * (size - len(values)), dtype)
        return cls(
            temperature=column(lambda p: p.temperature, 0.0, np.float32),
            top_p=column(lambda p: p.top_p, 1.0, np.float32),
            top_k=column(lambda p: p.top_k, -1, np.int32),
            min_p=column(lambda p: p.min_p, 0.0, np.float32),
            seed=np.asarray(list(seeds) + [0] * (size - len(seeds)), np.uint32),
            position=np.asarray(list(positions) + [0] * (size - len(positions)), np.int32),
            frequency_penalty=column(lambda p: p.frequency_penalty, 0.0, np.float32),
            presence_penalty=column(lambda p: p.presence_penalty, 0.0, np.float32),
            penalized_ids=_penalized_ids(params, outputs, size),
            **_logit_biases(params, size),
            top_logprobs=TOP_LOGPROBS_MAX if any(p is not None and p.top_logprobs_num for p in params) else 0,
            all_greedy=all(p is None or p.temperature == 0.0 for p in params),
            may_exceed_candidates=any(p is not None and p.temperature != 0.0 and not 0 < p.top_k <= CANDIDATES
                                      and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0) for p in params),
        )


def _slot_rows(rows: dict[int, list], size: int, width: int, fill, dtype) -> np.ndarray:
    """[size, width] with slot i's row from rows (width: a power of two, few compiled widths; 0
    when no slot has one), `fill` elsewhere."""
    out = np.full((size, width), fill, dtype)
    for i, row in rows.items():
        out[i, :len(row)] = row
    return out


def _penalized_ids(params, outputs, size: int) -> np.ndarray:
    penalized = {i: outputs[i] for i, p in enumerate(params)
                 if p is not None and (p.frequency_penalty or p.presence_penalty) and outputs and outputs[i]}
    width = 1 << max(map(len, penalized.values())).bit_length() if penalized else 0
    return _slot_rows(penalized, size, width, -1, np.int32)


def _logit_biases(params, size: int) -> dict[str, np.ndarray]:
    """bias_ids and bias_values [size, W]."""
    biases = {i: p.logit_bias for i, p in enumerate(params) if p is not None and p.logit_bias}
    width = 1 << (max(map(len, biases.values())) - 1).bit_length() if biases else 0
    return {"bias_ids": _slot_rows({i: list(b) for i, b in biases.items()}, size, width, -1, np.int32),
            "bias_values": _slot_rows({i: list(b.values()) for i, b in biases.items()}, size, width, 0, np.float32)}


TOP_LOGPROBS_MAX = 20
CANDIDATES = 256


def top_k_carrying(x: jax.Array, k: int, *carried: jax.Array):
    """lax.top_k of x [B, V] along V (values, ids; equal values in the order of their ids), with
    `carried` arrays of x's shape taken at the same ids. `sample` takes another function of
    this signature where the vocabulary is split over devices (sharding.forward.vocab_top_k)."""
    values, ids = jax.lax.top_k(x, k)
    return (values, ids, *(jnp.take_along_axis(c, ids, axis=-1) for c in carried))


def sample(logits: jax.Array, params: SamplingBatch, candidates: int = CANDIDATES,
           select_top_k: Callable = top_k_carrying):
    """logits: fp32 [B, V]. Frequency and presence penalties (OpenAI's definitions) subtract
    penalty * count and penalty * (count > 0) of each token already in the slot's output; a
    logit_bias adds its values to its tokens' logits (both before the draw, greedy included).

    The draw never sorts the vocabulary when it need not: an all-greedy batch (known on the host,
    `params.all_greedy`) takes the argmax;
    plain temperature sampling is a Gumbel-max over the whole vocabulary; top-k / top-p / min-p
    filter the `candidates` most likely tokens, which is exact whenever the kept set lies among
    them, and falls back to sorting the whole vocabulary for the batch when it might not.

    select_top_k: `top_k_carrying`, or where the logits are split over devices along the
    vocabulary (tensor parallelism) one that takes each part's top k first, so that the filters'
    candidates and the top logprobs gather only k x parts values a row; argmax and log-softmax
    are partitioned by the compiler. The full sort of the fallback (filters that may keep more
    than `candidates` tokens, in a branch taken only then) still gathers the row.

    Returns (tokens [B], logprob of each token [B], top-logprob ids and values [B, 20], or
    [B, 0] when no slot asked for them); the
    logprobs are of the model's distribution (log-softmax of the raw logits).
    """
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    if params.uses_penalties:
        counts = _scatter_add(jnp.zeros_like(logits), params.penalized_ids, 1.0)
        logits = logits - params.frequency_penalty[:, None] * counts
        logits = logits - params.presence_penalty[:, None] * (counts > 0)
    if params.bias_ids.shape[1]:
        logits = _scatter_add(logits, params.bias_ids, params.bias_values)
    greedy_tokens = jnp.argmax(logits, axis=-1)
    if params.all_greedy:
        tokens = greedy_tokens.astype(jnp.int32)
    else:
        draw = _draw(logits, params, candidates, select_top_k)
        tokens = jnp.where(params.temperature == 0.0, greedy_tokens, draw).astype(jnp.int32)
    token_logprobs = jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
    if params.top_logprobs:            # a sort of the vocabulary: only when a request asks
        top_values, top_ids = select_top_k(logprobs_all, min(params.top_logprobs, logits.shape[-1]))
    else:
        top_values, top_ids = jnp.zeros((logits.shape[0], 0)), jnp.zeros((logits.shape[0], 0), jnp.int32)
    return tokens, token_logprobs, top_ids.astype(jnp.int32), top_values


def _scatter_add(dense: jax.Array, ids: jax.Array, values: jax.Array | float) -> jax.Array:
    """dense [B, V] with values added at each slot's ids [B, W] (-1: none)."""
    rows = jnp.broadcast_to(jnp.arange(dense.shape[0])[:, None], ids.shape)
    return dense.at[rows, jnp.where(ids >= 0, ids, dense.shape[1])].add(values, mode="drop")


def _draw(logits: jax.Array, params: SamplingBatch, candidates: int,
          select_top_k: Callable = top_k_carrying) -> jax.Array:
    """Tokens drawn at temperature with the filters; see `sample`."""
    b, v = logits.shape
    cap = min(candidates, v)
    scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.PRNGKey(seed), pos))(params.seed, params.position)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,)))(keys)
    unfiltered = jnp.argmax(scaled + gumbel, axis=-1)

    top, idx, top_gumbel = select_top_k(scaled, cap, gumbel)               # sorted, descending
    probs = jnp.exp(top - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))  # true probabilities
    keep = _keep(probs, params.top_k, params.top_p, params.min_p)
    pick = jnp.argmax(jnp.where(keep, top + top_gumbel, -jnp.inf), axis=-1)
    filtered = jnp.take_along_axis(idx, pick[:, None], axis=-1)[:, 0]

    is_filtered = (params.top_k > 0) | (params.top_p < 1.0) | (params.min_p > 0.0)
    inside = ((params.top_k > 0) & (params.top_k <= cap)) | \
             ((params.top_p < 1.0) & (jnp.sum(probs, axis=-1) >= params.top_p)) | \
             ((params.min_p > 0.0) & (probs[:, -1] < params.min_p * probs[:, 0]))
    exact = jnp.where(is_filtered, filtered, unfiltered)
    if not params.may_exceed_candidates and candidates >= CANDIDATES:
        return exact
    return jax.lax.cond(jnp.all(~is_filtered | inside), lambda: exact,
                        lambda: jax.vmap(_sample_one)(logits, params.temperature, params.top_p, params.top_k,
                                                      params.min_p, params.seed, params.position))


def _keep(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Which of the tokens, sorted by probability, survive top-k, top-p and min-p."""
    rank = jnp.arange(probs.shape[-1])
    keep = jnp.where(top_k[..., None] > 0, rank < top_k[..., None], True)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[..., None]       # always keeps the first
    return keep & (probs >= min_p[..., None] * probs[..., :1])


def _sample_one(logits, temperature, top_p, top_k, min_p, seed, position):
    """The fallback: filters over the fully sorted vocabulary, then a draw."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    keep = _keep(jax.nn.softmax(sorted_logits), top_k, top_p, min_p)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), position)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice]
