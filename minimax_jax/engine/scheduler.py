"""Continuous batching with chunked prefill over a paged KV cache.

Each dp rank has its own Scheduler. A rank plans either prefill chunks of its admitted prompts or
one decode token for each running request; `assemble` pads all ranks' plans to one [D*B, T]
bucket (B and T from a small fixed set) so the jitted step compiles once per bucket. A decode
rank beside a prefilling one rides the same step as one-token chunks. A request is admitted only when pages for
its whole prompt plus max_new_tokens are free, so a running request never runs out of pages, and
only as the next prefill step has room for it.

With prefix caching (the allocator's), an admitted prompt starts on the cached pages that hold its
first full pages, less its last token (whose logits the first step needs), and prefills from
there; a request's full pages are cached as its prompt's chunks are computed and when it ends. A
burst of prompts sharing a system prompt computes it once: the first is admitted, the others wait
until it has computed what they share (`Scheduler._admit`).
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


@dataclasses.dataclass(eq=False)
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
    cached_tokens: int = 0            # of the prompt, found in the prefix cache at admission
    finish_reason: dict | None = None
    scheduler: "Scheduler | None" = dataclasses.field(default=None, repr=False)   # its dp rank's
    pending: int = 0                  # tokens sampled by a step still in flight (0 or 1)
    pending_slot: int = -1            # that step's output slot holding the token
    # prompt logprobs: the first prompt position scored (-1: none); per prompt position from it,
    # the log-probability of its token given those before (None for position 0) and the most
    # likely alternatives (with params.top_logprobs_num)
    logprob_start_len: int = -1
    input_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = dataclasses.field(default_factory=list)
    # while waiting: tokens its prompt shares with each prompt it waits for, by rid (Scheduler._admit)
    shared_with: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.logprob_start_len >= 0 and not self.input_logprobs:
            scored = max(len(self.prompt_ids) - self.logprob_start_len, 0)
            self.input_logprobs = [None] * scored
            self.input_top_logprobs = [None] * scored if self.params.top_logprobs_num else []

    def target(self, position: int) -> int:
        """The prompt token the logits at `position` score, or -1 (none asked)."""
        following = position + 1
        if 0 <= self.logprob_start_len <= following < len(self.prompt_ids):
            return self.prompt_ids[following]
        return -1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        """The newest token the host knows (the next decode input unless one is in flight)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, those still on the device included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def wants_more(self) -> bool:
        """Whether another decode step could add a token (max_new_tokens not yet reached)."""
        return len(self.output_ids) + self.pending < self.params.max_new_tokens


@dataclasses.dataclass
class RankPlan:
    """What one dp rank runs in the next step: a chunk of tokens per request."""
    requests: list[Request]
    chunks: list[list[int]]
    starts: list[int]                 # position of each chunk's first token
    samples: list[bool]               # does this step produce the request's next token
    sources: list[int] = dataclasses.field(default_factory=list)   # decode: slot of the in-flight
                                                                     # step holding the input token, or -1


@dataclasses.dataclass
class ScheduledStep:
    """Every rank's plan padded to one [D*B, T] bucket; slot = rank * B + index in its plan."""
    plans: list[RankPlan | None]
    batch: int
    step: StepInput
    logit_index: np.ndarray
    sampling: SamplingBatch
    sources: np.ndarray               # [D*B]: in-flight output slot of each slot's first token, or -1
    targets: np.ndarray | None = None  # [D*B, T]: the prompt token each position scores, -1 none

    def chunks(self) -> list[tuple[int, Request, int, int]]:
        """(slot, request, first position, tokens) of every request's chunk in this step."""
        return [(rank * self.batch + i, req, start, len(chunk))
                for rank, plan in enumerate(self.plans) if plan is not None
                for i, (req, chunk, start) in enumerate(zip(plan.requests, plan.chunks, plan.starts))]

    def sampled(self) -> list[tuple[int, Request]]:
        """(slot, request) of every request that gets a token from this step."""
        return [(rank * self.batch + i, req)
                for rank, plan in enumerate(self.plans) if plan is not None
                for i, req in enumerate(plan.requests) if plan.samples[i]]


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


SHARED_HEAD_TOKENS = 64        # a prompt sharing this many first tokens with one prefilling waits for its pages


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens two prompts share (a binary search over slices compared in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler:
    """The requests of one dp rank and the pages of its share of the KV cache."""

    def __init__(self, allocator: PageAllocator, page_size: int, max_running: int, chunk_size: int,
                 max_prefill_tokens: int, row_buckets: list[int] | None = None,
                 token_buckets: list[int] | None = None):
        """row_buckets and token_buckets are the padded step shapes (`assemble`): given both, a
        prefill step's budget counts the tokens it will compute, padding included."""
        self.allocator = allocator
        self.row_buckets, self.token_buckets = row_buckets, token_buckets
        self.page_size = page_size
        self.max_running = max_running
        self.chunk_size = chunk_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

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
        """Gives back the request's pages, caching its full ones first: their tokens are the
        prompt's and outputs' known on the host whose keys and values a launched step writes."""
        known = req.prompt_ids + req.output_ids
        self.allocator.remember(known[:min(req.num_computed, len(known))], req.pages)
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

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    def cached_pages(self, prompt: list[int], scored_from: int = -1) -> int:
        """Pages of this prompt that admission would find in the prefix cache now."""
        return len(self.allocator.cached(prompt, self._max_cached_pages(prompt, scored_from)))

    def _max_cached_pages(self, prompt: list[int], scored_from: int = -1) -> int:
        """The last token is always computed, and so is every position whose logits score a
        prompt token (from scored_from - 1, with prompt logprobs)."""
        computed_from = len(prompt) - 1 if scored_from < 0 else min(len(prompt) - 1, max(scored_from - 1, 0))
        return computed_from // self.page_size

    def _admit(self) -> None:
        """Admits waiting requests, oldest first, while their pages are free and the next prefill
        step has room for them: a burst is admitted a step's worth at a time, so a prompt admitted
        later starts on the pages the ones before it cached. A prompt whose first pages (at least
        SHARED_HEAD_TOKENS) equal those of a prompt still prefilling waits until that one has
        computed (and cached) what they share, however many chunks that takes; unrelated prompts
        go ahead. A shared system prompt is computed once, not once per request of the step."""
        prefilling = [r for r in self.running if not r.prefilled]
        demand = sum(self._next_chunk(r) for r in prefilling)
        leaders: dict[tuple[int, ...], list[Request]] = {}
        for r in prefilling:
            self._lead(leaders, r)
        deferred = []
        while self.waiting and len(self.running) < self.max_running and demand < self.max_prefill_tokens:
            req = self.waiting.popleft()
            if self._waits_for_a_leader(req, leaders):
                deferred.append(req)
                continue
            cached = self.allocator.match(req.prompt_ids, self._max_cached_pages(req.prompt_ids, req.logprob_start_len))
            need = self._pages_needed(req) - len(cached)
            if need > self.allocator.num_free:
                self.allocator.free(cached)
                self.waiting.appendleft(req)
                break
            req.pages = cached + self.allocator.allocate(need)
            req.num_computed = req.cached_tokens = len(cached) * self.page_size
            req.shared_with = {}
            self.running.append(req)
            demand += self._next_chunk(req)
            self._lead(leaders, req)
        self.waiting.extendleft(reversed(deferred))

    def _lead(self, leaders: dict, req: Request) -> None:
        head = self._head(req.prompt_ids)
        if head is not None:
            leaders.setdefault(head, []).append(req)

    def _waits_for_a_leader(self, req: Request, leaders: dict) -> bool:
        """Whether a prompt still prefilling shares req's first pages and has yet to compute all
        that req could take from it (the pages req may start on: `_max_cached_pages`). The
        shared length is measured once per pair (`Request.shared_with`)."""
        candidates = leaders.get(self._head(req.prompt_ids), ())
        usable = self._max_cached_pages(req.prompt_ids, req.logprob_start_len) * self.page_size
        for leader in candidates:
            if leader.rid not in req.shared_with:
                req.shared_with[leader.rid] = shared_prefix(req.prompt_ids, leader.prompt_ids)
            shared = min(req.shared_with[leader.rid], usable) // self.page_size * self.page_size
            if leader.num_computed < shared:
                return True
        return False

    def _next_chunk(self, req: Request) -> int:
        return min(len(req.prompt_ids) - req.num_computed, self.chunk_size)

    def _head(self, prompt: list[int]) -> tuple[int, ...] | None:
        """The prompt's first full pages of at least SHARED_HEAD_TOKENS tokens, when the prefix
        cache could hold them (its last token is always computed), else None."""
        if not self.allocator.prefix_caching:
            return None
        length = -(-SHARED_HEAD_TOKENS // self.page_size) * self.page_size
        return tuple(prompt[:length]) if len(prompt) > length else None

    # -- step assembly -------------------------------------------------------------------------

    def plan(self) -> RankPlan | None:
        """Prefill chunks of admitted prompts if any, else one decode token per request."""
        self._admit()
        prefilling = [r for r in self.running if not r.prefilled]
        if prefilling:
            return self._prefill_plan(prefilling)
        decoding = [r for r in self.running if r.prefilled and r.wants_more]
        if not decoding:
            return None
        # a token still on the device (step in flight) is read there, by slot, not waited for
        last = [0 if r.pending else r.last_token for r in decoding]
        return RankPlan(decoding, [[t] for t in last], [r.num_computed for r in decoding],
                        [True] * len(decoding), [r.pending_slot if r.pending else -1 for r in decoding])

    def _padded_tokens(self, rows: int, longest: int) -> int:
        if self.row_buckets is None or self.token_buckets is None:
            return 0
        return bucket(rows, self.row_buckets) * bucket(longest, self.token_buckets)

    def _prefill_plan(self, candidates: list[Request]) -> RankPlan:
        """Chunks of waiting prompts within max_prefill_tokens. One more request is not taken
        when it would lift the padded step past the budget (5 rows of 1024 compute as 8); it is
        when it only fills padding the step computes anyway."""
        plan, budget, longest = RankPlan([], [], [], []), self.max_prefill_tokens, 0
        for req in candidates[:self.max_running]:
            n = min(len(req.prompt_ids) - req.num_computed, self.chunk_size, budget)
            if n <= 0:
                break
            if plan.requests:
                now = self._padded_tokens(len(plan.requests), longest)
                after = self._padded_tokens(len(plan.requests) + 1, max(longest, n))
                if after > max(now, self.max_prefill_tokens):      # rows already padded in are free
                    break
            longest = max(longest, n)
            plan.requests.append(req)
            plan.chunks.append(req.prompt_ids[req.num_computed:req.num_computed + n])
            plan.starts.append(req.num_computed)
            plan.samples.append(req.num_computed + n == len(req.prompt_ids))
            budget -= n
        return plan

    def advance(self, plan: RankPlan) -> None:
        """Marks the plan's tokens as computed (their KV is now in the cache, or being written by
        the step in flight, ahead of any step that reads it); the full pages of each chunk's
        prompt computed so far are cached for the requests after it."""
        for req, chunk in zip(plan.requests, plan.chunks):
            prefilling = not req.prefilled
            req.num_computed += len(chunk)
            if prefilling:
                self.allocator.remember(req.prompt_ids[:req.num_computed], req.pages)


def _fill_page_table(page_table: np.ndarray, first: int, pages: list[list[int]], width: int) -> None:
    """Rows first, first + 1, ... of page_table take each list's first `width` pages, in one
    scattered write."""
    lengths = np.fromiter((min(len(p), width) for p in pages), np.int64, len(pages))
    flat = np.fromiter(itertools.chain.from_iterable(p[:width] for p in pages), np.int32, int(lengths.sum()))
    rows = np.repeat(np.arange(first, first + len(pages)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    page_table[rows, cols] = flat


def assemble(plans: list[RankPlan | None], batch_buckets: list[int], token_buckets: list[int],
             pages_per_seq: int, page_size: int) -> ScheduledStep:
    """Pads every rank's plan to the common bucket (the largest rank decides) and stacks them.
    A rank with no plan contributes only padding: it still runs the step, writing nothing.
    The page table is as wide as the longest sequence of the step needs (a power of two), not
    the whole context length: attention reads no page beyond it."""
    live = [p for p in plans if p is not None]
    b = bucket(max(len(p.requests) for p in live), batch_buckets)
    longest = max(len(c) for p in live for c in p.chunks)
    t = 1 if longest == 1 else bucket(longest, token_buckets)
    needed = max(-(-(s + len(c)) // page_size) for p in live for s, c in zip(p.starts, p.chunks))
    width = bucket(needed, powers_of_two(8, pages_per_seq)) if pages_per_seq > 8 else pages_per_seq
    d = len(plans)
    tokens = np.zeros((d * b, t), np.int32)
    positions = np.zeros((d * b, t), np.int32)
    valid = np.zeros((d * b, t), bool)
    page_table = np.zeros((d * b, width), np.int32)
    logit_index = np.zeros((d * b,), np.int32)
    params: list = [None] * (d * b)
    sources = np.full((d * b,), -1, np.int32)
    seeds, sample_pos, outputs = [0] * (d * b), [0] * (d * b), [[] for _ in range(d * b)]
    targets = None          # made only when a request scores its prompt: a compile of its own
    for rank, plan in enumerate(plans):
        if plan is None:
            continue
        # a decode step of a thousand slots fills its columns whole: slot by slot, numpy's small
        # writes took most of the host's time planning such a step
        first, m = rank * b, len(plan.requests)
        slots = slice(first, first + m)
        _fill_page_table(page_table, first, [req.pages for req in plan.requests], width)
        params[slots] = [req.params for req in plan.requests]
        seeds[slots] = [req.seed for req in plan.requests]
        sample_pos[slots] = [req.num_tokens for req in plan.requests]
        outputs[slots] = [req.output_ids for req in plan.requests]
        if plan.sources:
            sources[slots] = plan.sources
        if t == 1 and all(req.logprob_start_len < 0 for req in plan.requests):
            tokens[slots, 0] = [chunk[0] for chunk in plan.chunks]
            positions[slots, 0] = plan.starts
            valid[slots, 0] = True
            continue
        for i, (req, chunk, start) in enumerate(zip(plan.requests, plan.chunks, plan.starts)):
            slot, n = first + i, len(chunk)
            tokens[slot, :n] = chunk
            positions[slot, :n] = np.arange(start, start + n)
            valid[slot, :n] = True
            logit_index[slot] = n - 1
            if req.logprob_start_len >= 0:
                targets = np.full((d * b, t), -1, np.int32) if targets is None else targets
                targets[slot, :n] = [req.target(p) for p in range(start, start + n)]
    sampling = SamplingBatch.build(params, seeds, sample_pos, d * b, outputs)
    fresh = t > 1 and all(start == 0 for p in live for start in p.starts)
    step = StepInput(tokens=tokens, positions=positions, valid=valid, page_table=page_table, fresh=fresh)
    scoring = targets is not None and (targets >= 0).any()      # a scoring request's decode steps score nothing
    return ScheduledStep(plans, b, step, logit_index, sampling, sources, targets if scoring else None)
