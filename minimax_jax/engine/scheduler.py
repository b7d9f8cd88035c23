"""Continuous batching with chunked prefill over a paged KV cache.

Each step is either a prefill step (chunks of waiting prompts, B slots x T tokens) or a decode
step (one token for every running request). B and T are rounded up to a small fixed set of
buckets so the jitted step compiles once per bucket. A request is admitted only when pages for
its whole prompt plus max_new_tokens are free, so a running request never runs out of pages.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from typing import Iterable

import numpy as np

from minimax_jax.engine.sampling import SamplingBatch, SamplingParams
from minimax_jax.kv_cache import PageAllocator
from minimax_jax.model import StepInput

_ids = itertools.count()


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    rid: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    seed: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0             # tokens whose KV is in the cache
    finish_reason: dict | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclasses.dataclass
class ScheduledStep:
    requests: list[Request]
    step: StepInput
    logit_index: np.ndarray
    sampling: SamplingBatch
    samples: list[bool]               # per request: does this step produce its next token


def bucket(n: int, buckets: Iterable[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket")


def powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_pages_per_seq: int,
                 max_running: int, chunk_size: int, max_prefill_tokens: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.max_running = max_running
        self.chunk_size = chunk_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.batch_buckets = powers_of_two(1, max_running)
        self.token_buckets = powers_of_two(16, chunk_size) if chunk_size > 16 else [chunk_size]

    @property
    def context_length(self) -> int:
        return self.max_pages_per_seq * self.page_size

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in list(queue):
                if req.rid == rid:
                    queue.remove(req)
                    self.release(req)
                    return req
        return None

    def release(self, req: Request) -> None:
        self.allocator.free(req.pages)
        req.pages = []

    def finish(self, req: Request, reason: dict) -> None:
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        self.release(req)

    # -- admission -----------------------------------------------------------------------------

    def _pages_needed(self, req: Request) -> int:
        total = len(req.prompt_ids) + req.params.max_new_tokens
        return -(-total // self.page_size)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            need = self._pages_needed(req)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            req.pages = self.allocator.allocate(need)
            self.running.append(req)

    # -- step assembly -------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        self._admit()
        prefilling = [r for r in self.running if not r.prefilled]
        if prefilling:
            return self._prefill_step(prefilling)
        decoding = [r for r in self.running if r.prefilled]
        return self._decode_step(decoding) if decoding else None

    def _prefill_step(self, candidates: list[Request]) -> ScheduledStep:
        chosen, chunks, budget = [], [], self.max_prefill_tokens
        for req in candidates:
            n = min(len(req.prompt_ids) - req.num_computed, self.chunk_size, budget)
            if n <= 0 or len(chosen) == self.batch_buckets[-1]:
                break
            chosen.append(req)
            chunks.append(req.prompt_ids[req.num_computed:req.num_computed + n])
            budget -= n
        t = bucket(max(len(c) for c in chunks), self.token_buckets)
        starts = [r.num_computed for r in chosen]
        samples = [s + len(c) == len(r.prompt_ids) for r, s, c in zip(chosen, starts, chunks)]
        return self._assemble(chosen, chunks, starts, t, samples)

    def _decode_step(self, reqs: list[Request]) -> ScheduledStep:
        chunks = [[r.all_ids()[-1]] for r in reqs]
        starts = [r.num_computed for r in reqs]
        return self._assemble(reqs, chunks, starts, 1, [True] * len(reqs))

    def _assemble(self, reqs, chunks, starts, t, samples) -> ScheduledStep:
        b = bucket(len(reqs), self.batch_buckets)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        valid = np.zeros((b, t), bool)
        page_table = np.zeros((b, self.max_pages_per_seq), np.int32)
        logit_index = np.zeros((b,), np.int32)
        for i, (req, chunk, start) in enumerate(zip(reqs, chunks, starts)):
            n = len(chunk)
            tokens[i, :n] = chunk
            positions[i, :n] = np.arange(start, start + n)
            valid[i, :n] = True
            page_table[i, :len(req.pages)] = req.pages
            logit_index[i] = n - 1
        sampling = SamplingBatch.build([r.params for r in reqs], [r.seed for r in reqs],
                                       [len(r.all_ids()) for r in reqs], b)
        step = StepInput(tokens=tokens, positions=positions, valid=valid, page_table=page_table)
        return ScheduledStep(reqs, step, logit_index, sampling, samples)

    def advance(self, scheduled: ScheduledStep) -> None:
        """Marks the step's tokens as computed (their KV is now in the cache)."""
        for req, n in zip(scheduled.requests, scheduled.step.valid.sum(axis=1)):
            req.num_computed += int(n)
