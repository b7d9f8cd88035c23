"""AsyncEngine: the Engine behind an asyncio front end.

One background thread owns the Engine: it applies queued commands (submit, abort) between
steps and loops `engine.step()` while there is work, sleeping on a condition when idle. Engine
state is only ever touched from that thread, so the jitted device step never blocks the event
loop and no lock is held while it runs. New tokens travel back to each request's asyncio.Queue
through `loop.call_soon_threadsafe`.

    async_engine = AsyncEngine(Engine(...)); async_engine.start()
    req = async_engine.make_request(prompt="Hi", sampling_params={"max_new_tokens": 8})
    async for delta in async_engine.generate_stream(req):
        print(delta.text, delta.token_ids, delta.finish_reason)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from minimax_jax.engine.engine import Engine
from minimax_jax.engine.sampling import SamplingParams
from minimax_jax.engine.scheduler import Request
from minimax_jax.engine.tokenizer import IncrementalDecoder, Tokenizer, find_stop, stop_holdback

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The engine thread has stopped; no new request can be served."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_pages_used: int
    kv_pages_total: int
    kv_pages_cached: int = 0          # pages the prefix cache keeps, held by requests or not


@dataclasses.dataclass
class StreamDelta:
    """What one request produced since its previous delta."""
    text: str                                   # safe to show: never part of a stop string
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[float, int]]]
    prompt_tokens: int
    completion_tokens: int                      # cumulative
    finish_reason: dict | None = None           # engine format, set on the last delta only
    cached_tokens: int = 0                      # prompt tokens found in the prefix cache
    # prompt logprobs (Request.logprob_start_len >= 0), on the first delta only
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineObserver:
    """Hooks called from the engine thread (metrics); the defaults do nothing."""

    def on_submit(self, prompt_tokens: int) -> None: ...

    def on_first_token(self, seconds: float, cached_tokens: int = 0) -> None: ...

    def on_tokens(self, count: int) -> None: ...

    def on_finish(self, reason: str, time_per_output_token: float | None, e2e_seconds: float) -> None: ...

    def on_stats(self, stats: EngineStats) -> None: ...


@dataclasses.dataclass
class _TokenEvent:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[float, int]]]
    finish_reason: dict | None
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list | None = None


@dataclasses.dataclass
class _Sink:
    """Engine-thread bookkeeping of one live request, and the way back to its queue."""
    req: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    first_token_at: float | None = None
    published: int = 0
    prompt_scores_sent: bool = False

    def push(self, event: _TokenEvent) -> None:
        with contextlib.suppress(RuntimeError):      # the loop is already closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class StopTextFilter:
    """Incremental detokenisation with stop-string hold-back.

    push() returns only text that can no longer turn out to be part of a stop string; once a
    stop string appears the text ends just before it and `stopped` names it.
    """

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams):
        self.decoder = IncrementalDecoder(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.stops = [s for s in params.stop if s]
        self.text = ""
        self.sent = 0
        self.stopped: str | None = None

    def push(self, token_ids: list[int], final: bool) -> str:
        if self.decoder is None or self.stopped is not None:
            return ""
        for token in token_ids:
            self.text += self.decoder.feed(token)
        if final:
            self.text += self.decoder.flush()
        cut = find_stop(self.text, self.stops)
        if cut >= 0:
            self.stopped = next(s for s in self.stops if self.text.startswith(s, cut))
            self.text = self.text[:cut]
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - stop_holdback(self.text, self.stops)
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


class AsyncEngine:
    def __init__(self, engine: Engine, observer: EngineObserver | None = None):
        self.engine = engine
        self.observer = observer or EngineObserver()
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._live: dict[str, _Sink] = {}          # engine thread only
        self._thread = threading.Thread(target=self._run, name="minimax-engine", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stopping:
            self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts every live request (their streams end with finish reason abort) and stops."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- facts that never change -----------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def loaded_from(self) -> str:
        return self.engine.loaded_from

    def make_request(self, prompt: str | None = None, input_ids: list[int] | None = None,
                     sampling_params: dict[str, Any] | SamplingParams | None = None,
                     rid: str | None = None, logprob_start_len: int = -1) -> Request:
        """Validates and tokenises (raises RequestError); reads only immutable engine state."""
        return self.engine.make_request(prompt=prompt, input_ids=input_ids, sampling_params=sampling_params,
                                        rid=rid, logprob_start_len=logprob_start_len)

    # -- asyncio side --------------------------------------------------------------------------

    async def generate_stream(self, req: Request) -> AsyncIterator[StreamDelta]:
        """Submits req and yields its deltas; leaving early (cancel, aclose) aborts it."""
        queue: asyncio.Queue[_TokenEvent] = asyncio.Queue()
        sink = _Sink(req, asyncio.get_running_loop(), queue, time.perf_counter())
        self._post(lambda: self._submit(sink))
        text = StopTextFilter(self.tokenizer, req.params)
        completion_tokens, finished = 0, False
        try:
            while not finished:
                event = await queue.get()
                finish = event.finish_reason
                piece = text.push(event.token_ids, final=finish is not None)
                if finish is None and text.stopped is not None:
                    # the stop string showed up before the engine noticed: end it here
                    finish = {"type": "stop", "matched": text.stopped}
                    self.abort(req.rid, finish)
                completion_tokens += len(event.token_ids)
                finished = finish is not None
                yield StreamDelta(piece, event.token_ids, event.logprobs, event.top_logprobs,
                                  len(req.prompt_ids), completion_tokens, finish, req.cached_tokens,
                                  event.input_logprobs, event.input_top_logprobs)
        finally:
            if not finished:
                self.abort(req.rid)

    async def generate(self, req: Request) -> StreamDelta:
        """Runs req to the end; returns all of its output as one delta."""
        parts: list[StreamDelta] = []
        async with contextlib.aclosing(self.generate_stream(req)) as stream:
            async for delta in stream:
                parts.append(delta)
        return merge_deltas(parts)

    def abort(self, rid: str, reason: dict | None = None) -> None:
        """Thread-safe; frees the request's KV pages at the engine's next command pass.
        reason: the finish reason to record (default {"type": "abort"})."""
        with contextlib.suppress(EngineClosed):
            self._post(lambda: self._abort(rid, reason or {"type": "abort"}))

    async def flush_cache(self) -> int:
        """Empties the prefix cache of the pages no request holds, in the engine thread between
        steps; returns how many pages it dropped. Raises EngineClosed once shutting down."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def flush() -> None:
            count = self.engine.flush_cache()
            with contextlib.suppress(RuntimeError):      # the loop is already closed: nobody waits
                loop.call_soon_threadsafe(done.set_result, count)
        self._post(flush)
        return await done

    def _post(self, command: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                raise EngineClosed("the engine is shutting down")
            self._commands.append(command)
            self._cond.notify()

    # -- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        self._report_stats()
        running = True
        while running:
            commands, running = self._wait_for_work()
            for command in commands:
                command()
            if running and self.engine.has_work():
                self._step()
            self._report_stats()
        self._abort_all({"type": "abort", "message": "the server is shutting down"})
        self._report_stats()

    def _wait_for_work(self) -> tuple[list[Callable[[], None]], bool]:
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_work()):
                self._cond.wait()
            commands, self._commands = self._commands, []
            return commands, not self._stopping

    def _step(self) -> None:
        try:
            updated = self.engine.step()
        except Exception:
            log.exception("engine step failed; aborting every live request")
            self._abort_all({"type": "abort", "message": "internal engine error"})
            with contextlib.suppress(Exception):     # pages a failed step may never have written
                self.engine.flush_cache()
            return
        now = time.perf_counter()
        for req in updated:
            sink = self._live.get(req.rid)
            if sink is not None:
                self._publish(sink, now)

    def _submit(self, sink: _Sink) -> None:
        req = sink.req
        self._live[req.rid] = sink
        self.observer.on_submit(len(req.prompt_ids))
        try:
            self.engine.submit(req)
        except Exception as e:
            log.exception("submit failed for %s", req.rid)
            req.finish_reason = {"type": "abort", "message": str(e)}
        if req.finished:
            self._publish(sink, time.perf_counter())

    def _abort(self, rid: str, reason: dict) -> None:
        sink = self._live.get(rid)
        if sink is None:                 # already finished
            return
        sink.req.finish_reason = reason  # Engine.abort keeps a finish reason already set
        self.engine.abort(rid)
        self._publish(sink, time.perf_counter())

    def _abort_all(self, reason: dict) -> None:
        for rid, sink in list(self._live.items()):
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
            sink.req.finish_reason = reason
            self._publish(sink, time.perf_counter())

    def _publish(self, sink: _Sink, now: float) -> None:
        req, start = sink.req, sink.published
        new_ids = req.output_ids[start:]
        if new_ids and sink.first_token_at is None:
            sink.first_token_at = now
            self.observer.on_first_token(now - sink.arrival, sink.req.cached_tokens)
        self.observer.on_tokens(len(new_ids))
        sink.published = len(req.output_ids)
        finish = dict(req.finish_reason) if req.finish_reason is not None else None
        event = _TokenEvent(list(new_ids), req.output_logprobs[start:], req.output_top_logprobs[start:], finish)
        if req.logprob_start_len >= 0 and not sink.prompt_scores_sent and (new_ids or finish is not None):
            # complete once the prompt's last chunk ran, which is the step of the first token
            event.input_logprobs, event.input_top_logprobs = list(req.input_logprobs), list(req.input_top_logprobs)
            sink.prompt_scores_sent = True
        sink.push(event)
        if finish is not None:
            del self._live[req.rid]
            self._report_finish(sink, finish, now)

    def _report_finish(self, sink: _Sink, finish: dict, now: float) -> None:
        n = len(sink.req.output_ids)
        tpot = (now - sink.first_token_at) / (n - 1) if n > 1 and sink.first_token_at else None
        self.observer.on_finish(finish.get("type", "abort"), tpot, now - sink.arrival)

    def _report_stats(self) -> None:
        e = self.engine
        self.observer.on_stats(EngineStats(e.num_running, e.num_waiting, e.kv_pages_used, e.kv_pages_total,
                                           e.kv_pages_cached))


def merge_deltas(parts: list[StreamDelta]) -> StreamDelta:
    """One delta holding the concatenation of parts (the last one carries the finish reason)."""
    last = parts[-1]
    return StreamDelta(
        text="".join(p.text for p in parts),
        token_ids=[t for p in parts for t in p.token_ids],
        logprobs=[lp for p in parts for lp in p.logprobs],
        top_logprobs=[top for p in parts for top in p.top_logprobs],
        prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
        finish_reason=last.finish_reason, cached_tokens=last.cached_tokens,
        input_logprobs=next((p.input_logprobs for p in parts if p.input_logprobs is not None), None),
        input_top_logprobs=next((p.input_top_logprobs for p in parts if p.input_top_logprobs is not None), None))
