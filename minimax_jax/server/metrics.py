"""Prometheus metrics of the server, fed by AsyncEngine's observer hooks (engine thread)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from minimax_jax.engine.async_engine import EngineObserver, EngineStats

PREFIX = "minimax_jax_"
FINISH_REASONS = ("stop", "length", "abort")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics(EngineObserver):
    """All metrics live in their own registry, so several servers can share one process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge(PREFIX + "num_running_reqs", "Requests being prefilled or decoded", registry=r)
        self.waiting = Gauge(PREFIX + "num_waiting_reqs", "Requests queued for admission", registry=r)
        self.kv_pages_used = Gauge(PREFIX + "kv_pages_used", "KV cache pages owned by requests", registry=r)
        self.kv_pages_total = Gauge(PREFIX + "kv_pages_total", "KV cache pages in the pool", registry=r)
        self.kv_pages_cached = Gauge(PREFIX + "kv_pages_cached",
                                     "KV cache pages the prefix cache keeps, held by requests or not", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of submitted requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", registry=r)
        self.cached_prompt_tokens = Counter(PREFIX + "cached_prompt_tokens",
                                            "Prompt tokens found in the prefix cache", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Submission to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time between output tokens of a finished request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submission to finish",
                             buckets=_E2E_BUCKETS, registry=r)
        self.requests = Counter(PREFIX + "requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.aborted = Counter(PREFIX + "aborted_requests",
                               "Requests aborted (client gone, shutdown or engine error)", registry=r)
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)

    def on_submit(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def on_first_token(self, seconds: float, cached_tokens: int = 0) -> None:
        self.ttft.observe(seconds)
        if cached_tokens:
            self.cached_prompt_tokens.inc(cached_tokens)

    def on_tokens(self, count: int) -> None:
        if count:
            self.generation_tokens.inc(count)

    def on_finish(self, reason: str, time_per_output_token: float | None, e2e_seconds: float) -> None:
        self.requests.labels(finish_reason=reason).inc()
        if reason == "abort":
            self.aborted.inc()
        if time_per_output_token is not None:
            self.tpot.observe(time_per_output_token)
        self.e2e.observe(e2e_seconds)

    def on_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_pages_used.set(stats.kv_pages_used)
        self.kv_pages_total.set(stats.kv_pages_total)
        self.kv_pages_cached.set(stats.kv_pages_cached)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
