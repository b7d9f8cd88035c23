"""The OpenAI-compatible server as a real subprocess (scripts/serve.py), driven by the official
openai client and by httpx; transformers and the offline Engine are the oracles."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from minimax_jax.engine.async_engine import StopTextFilter
from minimax_jax.engine.sampling import SamplingParams
from minimax_jax.engine.tokenizer import TINY_TOKENIZER_DIR, Tokenizer
from minimax_jax.server.protocol import ReasoningSplitter, ThinkPrefixer

REPO = Path(__file__).resolve().parent.parent
SERVE = REPO / "scripts" / "serve.py"
API_KEY = "sk-test-key"
MODEL = "tiny-hf"
CONTEXT = 512
MAX_REQUEST_BYTES = 65536
COMMON_ARGS = ["--dtype", "float32", "--served-model-name", MODEL, "--context-length", str(CONTEXT),
               "--max-running-requests", "16", "--chunked-prefill-size", "32", "--page-size", "16",
               "--api-key", API_KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-level", "warning"]
# Server layouts the whole module runs against; the second also keeps chat outputs whole with the
# opened <think> put back in front, as MiniMax's own sglang command serves them
SERVER_VARIANTS = {"tp1": [], "dp2-tp4": ["--tp-size", "8", "--dp-size", "2", "--enable-dp-attention",
                                          "--reasoning-parser", "minimax-append-think", "--trust-remote-code"]}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT_MESSAGES = [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "What is the weather in Paris?"}]


# -- server process --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """scripts/serve.py on a free port of 127.0.0.1, ready once /health answers 200."""

    def __init__(self, args: list[str], log_path: Path, startup_timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(SERVE), *args, "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.kill()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny random MiniMax-M2 checkpoint (float32) with the shipped tiny tokenizer beside it."""
    from minimax_jax.hf_testing import make_hf_model, save_hf_checkpoint
    model = make_hf_model(seed=0)
    path = save_hf_checkpoint(model, tmp_path_factory.mktemp("tiny_hf_tok"), dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOKENIZER_DIR / name, path / name)
    return model, path


@pytest.fixture(scope="module", params=list(SERVER_VARIANTS))
def server(request, hf_model_dir, tmp_path_factory):
    _, path = hf_model_dir
    args = ["--model-path", str(path), *COMMON_ARGS, *SERVER_VARIANTS[request.param]]
    proc = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log")
    proc.chat_prefix = "<think>" if "minimax-append-think" in args else ""
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference_engine(hf_model_dir):
    from minimax_jax.engine.engine import Engine
    _, path = hf_model_dir
    return Engine(model_path=str(path), dtype="float32", context_length=CONTEXT, max_running_requests=4,
                  chunked_prefill_size=32)


@pytest.fixture(scope="module")
def tokenizer(hf_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(hf_model_dir[1])


def engine_greedy(engine, ids: list[int], max_tokens: int) -> dict:
    return engine.generate(input_ids=ids, sampling_params={"max_new_tokens": max_tokens, "temperature": 0.0})


def transformers_greedy(hf_model, ids: list[int], max_tokens: int, eos_id: int) -> list[int]:
    """Greedy tokens of transformers, cut after the first EOS (where the engine stops)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def metrics(http: httpx.Client) -> dict[str, float]:
    """Samples of /metrics as {'name{label=value}': value}."""
    text = http.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


# -- endpoints ---------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    cards = client.models.list().data
    assert [c.id for c in cards] == [MODEL]
    assert cards[0].max_model_len == CONTEXT


def test_health_and_metrics_answer_without_api_key(http):
    assert http.get("/health").json() == {"status": "ok"}
    m = metrics(http)
    assert m["minimax_jax_kv_pages_total"] > 0
    assert {"minimax_jax_num_running_reqs", "minimax_jax_num_waiting_reqs", "minimax_jax_kv_pages_used",
            "minimax_jax_kv_pages_cached",
            "minimax_jax_prompt_tokens_total", "minimax_jax_generation_tokens_total",
            "minimax_jax_time_to_first_token_seconds_count", "minimax_jax_time_per_output_token_seconds_count",
            "minimax_jax_requests_total{finish_reason=abort}", "minimax_jax_aborted_requests_total"} <= set(m)


def test_a_repeated_prompt_reports_its_cached_tokens_until_the_cache_is_flushed(client, http):
    ids = list(range(100, 140))                # 40 tokens: two full pages of 16 may be reused
    ask = lambda: client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0.0)  # noqa: E731
    first, second = ask(), ask()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32
    assert second.choices[0].text == first.choices[0].text
    assert metrics(http)["minimax_jax_cached_prompt_tokens_total"] >= 32
    assert http.post("/flush_cache").status_code == 401                 # --api-key guards it
    flushed = http.post("/flush_cache", headers={"Authorization": f"Bearer {API_KEY}"})
    assert flushed.status_code == 200 and flushed.json()["flushed_pages"] >= 2
    assert ask().usage.prompt_tokens_details.cached_tokens == 0


def test_native_generate_gives_the_engines_greedy_tokens_whole_streamed_and_batched(http, reference_engine):
    ids, other = list(range(200, 212)), list(range(300, 309))
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    want = engine_greedy(reference_engine, ids, 6)["output_ids"]
    whole = http.post("/generate", headers=auth(), json={"input_ids": ids, "sampling_params": greedy,
                                                          "return_logprob": True}).json()
    assert whole["output_ids"] == want and whole["meta_info"]["completion_tokens"] == len(want)
    assert whole["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert [entry[1] for entry in whole["meta_info"]["output_token_logprobs"]] == want
    with http.stream("POST", "/generate", headers=auth(), json={"input_ids": ids, "sampling_params": greedy,
                                                                "stream": True}) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["output_ids"] == want and chunks[-1]["text"] == whole["text"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    batch = http.post("/generate", headers=auth(), json={"input_ids": [ids, other], "sampling_params": greedy}).json()
    assert [r["output_ids"] for r in batch] == [want, engine_greedy(reference_engine, other, 6)["output_ids"]]
    with http.stream("POST", "/generate", headers=auth(), json={"input_ids": [ids, other], "sampling_params": greedy,
                                                                "stream": True}) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = {}
    for event in map(json.loads, events[:-1]):      # cumulative per request, interleaved by index
        last[event["index"]] = event
    assert [last[i]["output_ids"] for i in (0, 1)] == [r["output_ids"] for r in batch]
    assert all(last[i]["meta_info"]["finish_reason"] is not None for i in (0, 1))
    assert http.get("/get_model_info", headers=auth()).json()["model_path"] == MODEL


@pytest.mark.parametrize("body, status, param", [
    ({"text": "hi", "input_ids": [1, 2]}, 400, "text"),
    ({"text": "hi", "image_data": "x.png"}, 400, "image_data"),
    ({"text": "hi", "sampling_params": {"temperature": -1}}, 400, "temperature"),
    ({"text": "hi", "return_logprob": True, "logprob_start_len": -2}, 400, "logprob_start_len"),
], ids=["text-and-ids", "image", "bad-temperature", "bad-logprob-start"])
def test_native_generate_refuses_what_it_cannot_do_by_name(http, body, status, param):
    response = http.post("/generate", headers=auth(), json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text
    assert http.post("/generate", json={"text": "hi"}).status_code == 401


def test_n_choices_and_batched_prompts_come_back_indexed_with_their_usage(client, reference_engine):
    ids, other = list(range(220, 230)), list(range(330, 337))
    want = [engine_greedy(reference_engine, p, 4)["output_ids"] for p in (ids, other)]
    out = client.completions.create(model=MODEL, prompt=[ids, other], n=2, max_tokens=4, temperature=0.0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in out.choices] == [want[0], want[0], want[1], want[1]]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids) + len(other), 16)
    sampled = client.completions.create(model=MODEL, prompt=ids, n=3, max_tokens=8, temperature=1.0, seed=5,
                                        extra_body={"return_token_ids": True, "ignore_eos": True})
    assert len({tuple(c.token_ids) for c in sampled.choices}) > 1        # seeds 5, 6, 7: different draws
    chunks = list(client.completions.create(model=MODEL, prompt=ids, n=2, max_tokens=4, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True, "ignore_eos": True}))
    streamed = {0: [], 1: []}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            streamed[choice.index] += choice.token_ids or []
    assert streamed == {0: want[0], 1: want[0]} and chunks[-1].usage.completion_tokens == 8
    chat = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, n=2, max_tokens=5, temperature=0.0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content
    chat_chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, n=2, max_tokens=5,
                                                      temperature=0.0, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chat_chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: chat.choices[0].message.content, 1: chat.choices[0].message.content}


def test_prompt_logprobs_come_back_echoed_and_natively_as_the_engine_scores_them(client, http, reference_engine,
                                                                                tokenizer):
    """Completions with echo and logprobs (how evaluation harnesses score a text: max_tokens 0 or
    1) give the prompt's tokens first, the first without a logprob; /generate with
    logprob_start_len gives meta_info.input_token_logprobs from that position."""
    prompt = "The river town woke slowly on market days."
    ids = tokenizer.encode(prompt)
    ref = reference_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0.0,
                                                                     "top_logprobs_num": 2},
                                    return_logprob=True, logprob_start_len=0)["meta_info"]
    ref_scores = [lp for lp, _, _ in ref["input_token_logprobs"]]
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(ref_scores[1:], abs=1e-4)
    # (two alternatives that decode to the same text share one key of OpenAI's dict); a token that
    # is the most likely has exactly the top logprob, as lm-evaluation-harness's is_greedy compares
    assert all(0 < len(top) <= 2 and max(top.values()) >= lp
               for top, lp in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.token_logprobs[1:]))
    assert choice.logprobs.text_offset[:2] == [0, len(choice.logprobs.tokens[0])]
    # lm-evaluation-harness's local-completions loglikelihood request: token-id prompts, batched
    harness = client.completions.create(model=MODEL, prompt=[ids, ids[:5]], max_tokens=1, echo=True, logprobs=1,
                                        temperature=0, seed=1234)
    one, short = harness.choices
    assert one.logprobs.token_logprobs[1:len(ids)] == pytest.approx(ref_scores[1:], abs=1e-4)
    assert len(one.logprobs.tokens) == len(ids) + 1 and len(short.logprobs.tokens) == 6
    assert short.logprobs.token_logprobs[1:5] == pytest.approx(ref_scores[1:5], abs=1e-4)
    assert one.text.startswith(tokenizer.decode(ids))
    streamed = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True,
                                                                 logprobs=1, temperature=0, stream=True)]
    assert "".join(c.text for c in streamed) == one.text
    streamed_logprobs = [lp for c in streamed for lp in c.logprobs.token_logprobs]   # (alone, not in a batch)
    assert streamed_logprobs[0] is None and streamed_logprobs[1:] == pytest.approx(one.logprobs.token_logprobs[1:],
                                                                                    abs=1e-5)
    assert [o for c in streamed for o in c.logprobs.text_offset] == one.logprobs.text_offset
    native = http.post("/generate", headers=auth(), json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}, "return_logprob": True,
        "logprob_start_len": 3}).json()["meta_info"]
    assert [t for _, t, _ in native["input_token_logprobs"]] == ids[3:]
    assert [lp for lp, _, _ in native["input_token_logprobs"]] == pytest.approx(ref_scores[3:], abs=1e-4)
    assert len(native["output_token_logprobs"]) == 2 and "input_top_logprobs" not in native


def test_logit_bias_forces_and_bans_tokens_on_both_apis(client, http, reference_engine):
    ids = list(range(240, 250))
    greedy = engine_greedy(reference_engine, ids, 4)["output_ids"]
    forced = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, logit_bias={"77": 100},
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    assert forced.choices[0].token_ids == [77] * 4
    banned = http.post("/generate", headers=auth(), json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": 1, "temperature": 0.0, "logit_bias": {str(greedy[0]): -100}}}).json()
    assert banned["output_ids"][0] != greedy[0]
    out_of_vocab = http.post("/v1/completions", headers=auth(), json=_body(logit_bias={"10000000": 1}))
    assert out_of_vocab.status_code == 400 and out_of_vocab.json()["error"]["param"] == "logit_bias"


# -- greedy outputs against the oracles ----------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completion_greedy_tokens_match_engine_and_transformers(client, hf_model_dir, reference_engine,
                                                                  tokenizer, stream):
    prompt, max_tokens = "The river town woke slowly on market days.", 16
    ids = tokenizer.encode(prompt)
    ref = engine_greedy(reference_engine, ids, max_tokens)
    assert ref["output_ids"] == transformers_greedy(hf_model_dir[0], ids, max_tokens, tokenizer.eos_token_id)
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                  extra_body={"return_token_ids": True})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        choices = [c.choices[0] for c in chunks if c.choices]
        tokens = [t for c in choices for t in c.token_ids]
        text, finish, usage = "".join(c.text for c in choices), choices[-1].finish_reason, chunks[-1].usage
        assert all(c.finish_reason is None for c in choices[:-1])
    else:
        out = client.completions.create(**kwargs)
        choice = out.choices[0]
        tokens, text, finish, usage = choice.token_ids, choice.text, choice.finish_reason, out.usage
        assert choice.prompt_token_ids == ids
    assert tokens == ref["output_ids"]
    assert text == ref["text"]
    assert finish == ref["meta_info"]["finish_reason"]["type"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(tokens))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_renders_template_with_tools_and_greedy_tokens_match(client, server, hf_model_dir, reference_engine,
                                                                   tokenizer, stream):
    max_tokens = 12
    ids = tokenizer.encode_chat(CHAT_MESSAGES, [WEATHER_TOOL])
    assert len(ids) > len(tokenizer.encode_chat(CHAT_MESSAGES))      # the tools are in the prompt
    ref = engine_greedy(reference_engine, ids, max_tokens)
    assert ref["output_ids"] == transformers_greedy(hf_model_dir[0], ids, max_tokens, tokenizer.eos_token_id)
    kwargs = dict(model=MODEL, messages=CHAT_MESSAGES, tools=[WEATHER_TOOL], max_completion_tokens=max_tokens,
                  temperature=0, extra_body={"return_token_ids": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        choices = [c.choices[0] for c in chunks if c.choices]
        assert choices[0].delta.role == "assistant"
        tokens = [t for c in choices for t in c.token_ids]
        text = "".join(c.delta.content or "" for c in choices)
        finish, usage = choices[-1].finish_reason, chunks[-1].usage
    else:
        out = client.chat.completions.create(**kwargs)
        choice = out.choices[0]
        assert out.prompt_token_ids == ids
        tokens, text, finish, usage = choice.token_ids, choice.message.content, choice.finish_reason, out.usage
    assert tokens == ref["output_ids"]
    assert text == server.chat_prefix + ref["text"]
    assert finish == ref["meta_info"]["finish_reason"]["type"]
    assert usage.prompt_tokens == len(ids)


def test_chat_logprobs_are_the_chosen_tokens_and_top_alternatives(client, reference_engine, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for entry in entries:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string_ends_the_text_and_is_never_streamed(client, reference_engine, tokenizer, stream):
    prompt = "Fishermen mended their nets on the stone steps"
    full = engine_greedy(reference_engine, tokenizer.encode(prompt), 24)["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never-appears"])
    if stream:
        choices = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
        pieces = [c.text for c in choices]
        assert "".join(pieces) == expected and all(stop not in p for p in pieces)
        assert choices[-1].finish_reason == "stop"
    else:
        choice = client.completions.create(**kwargs).choices[0]
        assert (choice.text, choice.finish_reason) == (expected, "stop")


def test_64_concurrent_streams_each_equal_the_request_run_alone(client, server):
    rng = random.Random(0)
    jobs = []
    for i in range(64):
        n = rng.randint(1, 48)
        words = " ".join(rng.choice(["river", "town", "bread", "nets", "hill"]) for _ in range(n))
        prompt = [rng.randrange(500) for _ in range(n)] if i % 2 else words     # token ids or text
        jobs.append((prompt, rng.randint(4, 24)))

    async def stream_one(aclient: openai.AsyncOpenAI, prompt, max_tokens: int) -> tuple[set, list[int], str, list]:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                  stream=True, extra_body={"return_token_ids": True})
        ids, tokens, text, finishes = set(), [], "", []
        async for chunk in stream:
            ids.add(chunk.id)
            choice = chunk.choices[0]
            tokens += choice.token_ids
            text += choice.text
            finishes.append(choice.finish_reason)
        return ids, tokens, text, finishes

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(stream_one(aclient, p, m) for p, m in jobs))

    together = asyncio.run(run_all())
    stream_ids = [next(iter(ids)) for ids, *_ in together]
    assert all(len(ids) == 1 for ids, *_ in together) and len(set(stream_ids)) == 64
    for (prompt, max_tokens), (_, tokens, text, finishes) in zip(jobs, together):
        assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])
        assert len(tokens) == max_tokens or finishes[-1] == "stop"
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body={"return_token_ids": True}).choices[0]
        assert (tokens, text) == (alone.token_ids, alone.text)


def run_bench_url(server, tmp_path, *flags: str) -> dict:
    """scripts/bench.py's engine section against this server with the tiny preset's vocabulary:
    its rows by variant."""
    import json
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--sections", "engine", "--url",
                           server.url, "--preset", "tiny", *flags, "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OPENAI_API_KEY": API_KEY, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {r["variant"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}


def test_bench_url_mode_streams_the_workload_and_counts_every_token(server, tmp_path):
    """scripts/bench.py --url drives this server through the openai client: 6 requests of 5
    tokens at 3 in flight, every token counted from the streamed token ids."""
    rows = run_bench_url(server, tmp_path, "--requests", "6", "--prompt", "20", "--output", "5",
                         "--max-running-requests", "3")
    tag = f"{server.url} {MODEL} 6x20/5 at 3 in flight"
    assert rows[f"{tag} output throughput"]["value"] > 0
    assert "30 tokens" in rows[f"{tag} output throughput"]["note"]
    assert 0 < rows[f"{tag} TTFT p50/p99"]["value"] < 60


def test_bench_url_mode_scores_every_prompt_through_echo(server, tmp_path):
    """--logprob-start-len 0 against a server: each prompt echoed with its logprobs, every
    position but the first scored."""
    rows = run_bench_url(server, tmp_path, "--requests", "3", "--prompt", "20", "--output", "1",
                         "--logprob-start-len", "0")
    assert rows[f"{server.url} {MODEL} 3x20/1 prompt-logprobs prompt tokens scored"]["value"] == 3 * 19


# -- bad input ----------------------------------------------------------------------------------------

def _body(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **fields}


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


BAD_REQUESTS = {
    # name: (path, json body or raw bytes, headers, status, param, code)
    "malformed-json": ("/v1/completions", b'{"prompt": "hi",', auth(), 400, None, None),
    "body-not-an-object": ("/v1/completions", b"[1, 2]", auth(), 400, None, None),
    "temperature-wrong-type": ("/v1/completions", _body(temperature="hot"), auth(), 400, "temperature", None),
    "max-tokens-wrong-type": ("/v1/completions", _body(max_tokens="ten"), auth(), 400, "max_tokens", None),
    "prompt-wrong-type": ("/v1/completions", _body(prompt={"text": "hi"}), auth(), 400, "prompt", None),
    "messages-wrong-type": ("/v1/chat/completions", _chat(messages="hi"), auth(), 400, "messages", None),
    "message-role-unknown": ("/v1/chat/completions", _chat(messages=[{"role": "bot", "content": "x"}]), auth(),
                             400, "messages[0].role", None),
    "empty-prompt": ("/v1/completions", _body(prompt=""), auth(), 400, "prompt", None),
    "empty-token-prompt": ("/v1/completions", _body(prompt=[]), auth(), 400, "prompt", None),
    "prompt-token-out-of-vocab": ("/v1/completions", _body(prompt=[1, 2, 100000]), auth(), 400, "prompt", None),
    "prompt-longer-than-context": ("/v1/completions", _body(prompt=[7] * (CONTEXT + 10)), auth(), 400, "prompt", None),
    "max-tokens-zero": ("/v1/completions", _body(max_tokens=0), auth(), 400, "max_tokens", None),
    "max-tokens-negative": ("/v1/completions", _body(max_tokens=-5), auth(), 400, "max_tokens", None),
    "max-tokens-beyond-context": ("/v1/completions", _body(max_tokens=CONTEXT), auth(), 400, "max_tokens", None),
    "max-completion-tokens-beyond-context": ("/v1/chat/completions", _chat(max_completion_tokens=10 * CONTEXT),
                                             auth(), 400, "max_completion_tokens", None),
    "temperature-negative": ("/v1/completions", _body(temperature=-0.5), auth(), 400, "temperature", None),
    "top-p-zero": ("/v1/completions", _body(top_p=0), auth(), 400, "top_p", None),
    "top-p-above-one": ("/v1/chat/completions", _chat(top_p=1.5), auth(), 400, "top_p", None),
    "logprobs-too-many": ("/v1/completions", _body(logprobs=21), auth(), 400, "logprobs", None),
    "n-above-the-cap": ("/v1/completions", _body(n=17), auth(), 400, "n", None),
    "empty-prompt-in-a-batch": ("/v1/completions", _body(prompt=["hi", ""]), auth(), 400, "prompt", None),
    "unknown-model": ("/v1/completions", _body(model="gpt-4"), auth(), 404, "model", "model_not_found"),
    "missing-api-key": ("/v1/completions", _body(), {}, 401, None, "invalid_api_key"),
    "wrong-api-key": ("/v1/chat/completions", _chat(), {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    "body-over-limit": ("/v1/completions", _body(prompt="x" * (MAX_REQUEST_BYTES + 1)), auth(), 413, None,
                        "request_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_naming_the_field_and_server_keeps_serving(http, case):
    path, body, headers, status, param, code = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = http.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    good = http.post("/v1/completions", json=_body(max_tokens=1), headers=auth())
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_chunked_body_over_limit_gets_413(http):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'
    r = http.post("/v1/completions", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert http.post("/v1/completions", json=_body(max_tokens=1), headers=auth()).status_code == 200


# -- disconnects ----------------------------------------------------------------------------------------

def _long_request(stream: bool) -> dict:
    return _body(prompt="Once upon a time", max_tokens=CONTEXT - 16, temperature=0, ignore_eos=True, stream=stream)


def test_client_disconnect_mid_stream_aborts_the_request_and_frees_its_pages(http, server):
    before = metrics(http)
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=_long_request(True), headers=auth()) as r:
            assert r.status_code == 200
            lines = r.iter_lines()     # held: closing this generator would close the connection
            events = 0
            while events < 2:
                events += next(lines).startswith("data: {")
            during = metrics(http)
            assert during["minimax_jax_kv_pages_used"] > 0 and during["minimax_jax_num_running_reqs"] == 1
    aborted = "minimax_jax_requests_total{finish_reason=abort}"
    assert wait_for(lambda: metrics(http)[aborted] == before[aborted] + 1)
    # the gauges follow once the engine thread reports its stats, after the abort's command
    assert wait_for(lambda: metrics(http)["minimax_jax_kv_pages_used"] == 0)
    after = metrics(http)
    assert after["minimax_jax_num_running_reqs"] == 0
    assert after["minimax_jax_aborted_requests_total"] == before["minimax_jax_aborted_requests_total"] + 1


def test_client_giving_up_on_a_whole_response_aborts_the_request(http, server):
    before = metrics(http)
    with httpx.Client(base_url=server.url) as other:
        with pytest.raises(httpx.ReadTimeout):
            other.post("/v1/completions", json=_long_request(False), headers=auth(),
                       timeout=httpx.Timeout(60, read=0.3))
    aborted = "minimax_jax_requests_total{finish_reason=abort}"
    assert wait_for(lambda: metrics(http)[aborted] == before[aborted] + 1)
    assert wait_for(lambda: metrics(http)["minimax_jax_kv_pages_used"] == 0)


# -- process lifecycle -------------------------------------------------------------------------------

def test_sigterm_ends_in_flight_streams_and_stops_the_tiny_model_server_cleanly(tmp_path):
    proc = ServerProcess(["--dtype", "float32", "--context-length", "1024", "--max-running-requests", "2",
                          "--graceful-shutdown-timeout", "0.5", "--log-level", "info"], tmp_path / "server.log")
    try:
        assert re.search(rf"^serving the embedded tiny preset.* on http://127\.0\.0\.1:{proc.port}$", proc.log(), re.M)
        c = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert c.models.list().data[0].id == "minimax-jax-tiny"
        assert c.completions.create(model="minimax-jax-tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        body = {"prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: {")
            start = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"abort"' in rest[-2]
        assert proc.proc.wait(timeout=15) == 0, proc.log()
        assert time.monotonic() - start < 10
    finally:
        proc.kill()


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(SERVE), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model-path", "--tokenizer-path", "--served-model-name", "--tp-size", "--dp-size", "--ep-size",
                 "--enable-dp-attention", "--dtype", "--quantization", "--context-length", "--max-running-requests",
                 "--page-size", "--chunked-prefill-size", "--max-total-tokens", "--host", "--port", "--api-key",
                 "--random-seed", "--reasoning-parser", "--tool-call-parser", "--log-level", "--max-request-bytes",
                 "--cuda-graph-max-bs", "--trust-remote-code"):
        assert flag in out


def _serve_module():
    spec = importlib.util.spec_from_file_location("serve_script", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_flags_pass_through_only_to_fields_the_engine_has():
    from minimax_jax.engine.engine import EngineArgs
    serve = _serve_module()
    args = serve.build_parser().parse_args(["--quantization", "fp8", "--tp-size", "2", "--page-size", "8"])
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = serve.engine_kwargs(args)
    assert kwargs["tp_size"] == 2 and kwargs["page_size"] == 8 and "context_length" not in kwargs
    assert ("quantization" in kwargs) == ("quantization" in fields)
    with pytest.raises(ValueError, match="--quantization fp8 is not supported yet"):
        serve.engine_kwargs(args, fields=fields - {"quantization"})
    # every engine option has its flag, and a flag the table missed would be dropped silently
    assert set(serve.ENGINE_FLAGS.values()) == fields
    assert serve.engine_kwargs(serve.build_parser().parse_args(["--cuda-graph-max-bs", "4"]))["cuda_graph_max_bs"] == 4


# -- streaming text helpers (no server) -------------------------------------------------------------

def test_stop_filter_holds_back_a_possible_stop_until_it_is_decided():
    tok = Tokenizer.tiny()
    ids = [i for ch in "xab-abc-tail" for i in tok.encode(ch)]
    f = StopTextFilter(tok, SamplingParams(stop=["abc"]))
    pieces = [f.push([t], final=False) for t in ids]
    assert "".join(pieces) == "xab-" and f.stopped == "abc"
    assert pieces[:4] == ["x", "", "", "ab-"]            # "ab" waited until "-" ruled out "abc"


@pytest.mark.parametrize("text", ["<think>\nplan it\n</think>\n\nThe answer.", "\nplan</think>answer  ",
                                  "still thinking\n", "<thi", "no tags </thin"])
def test_reasoning_split_is_the_same_for_any_chunking(text):
    whole = ReasoningSplitter().feed(text, final=True)      # the whole output at once, as a response
    for size in (1, 2, 3, 5):
        splitter, reasoning, content = ReasoningSplitter(), "", ""
        pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
        for i, piece in enumerate(pieces):
            r, c = splitter.feed(piece, final=i == len(pieces) - 1)
            reasoning, content = reasoning + r, content + c
        assert (reasoning, content) == whole
    if "</think>" in text:
        assert whole == (text.split("</think>")[0].removeprefix("<think>").strip(), text.split("</think>")[1].lstrip())


def test_append_think_keeps_the_whole_output_as_content_behind_the_opened_think_for_any_chunking():
    text = "\nplan it\n</think>\n\nThe answer."
    for size in (1, 4, len(text)):
        prefixer, reasoning, content = ThinkPrefixer(), "", ""
        for i in range(0, len(text), size):
            r, c = prefixer.feed(text[i:i + size], final=i + size >= len(text))
            reasoning, content = reasoning + r, content + c
        assert (reasoning, content) == ("", "<think>" + text)


def test_minimax_sglang_command_line_runs_unchanged():
    # the flags of MiniMax's own sglang deployment command for its M2 models
    serve = _serve_module()
    args = serve.build_parser().parse_args([
        "--model-path", "MiniMaxAI/MiniMax-M2.5", "--tp-size", "4", "--tool-call-parser", "minimax-m2",
        "--reasoning-parser", "minimax-append-think", "--host", "0.0.0.0", "--trust-remote-code", "--port", "8000",
        "--mem-fraction-static", "0.85"])
    assert args.reasoning_parser == "minimax-append-think" and args.trust_remote_code
    kwargs = serve.engine_kwargs(args)
    assert kwargs["tp_size"] == 4 and kwargs["mem_fraction_static"] == 0.85
    assert not {"enable_ar_fusion", "cuda_graph_max_bs"} & set(kwargs)     # the aliases set no default
    # and the seed's names for what the engine calls otherwise
    seed = serve.engine_kwargs(serve.build_parser().parse_args([
        "--tp", "4", "--dp", "4", "--enable-dp-attention", "--enable-flashinfer-allreduce-fusion",
        "--disable-flashinfer-cutlass-moe-fp4-allgather", "--disable-cuda-graph", "--enable-metrics"]))
    assert seed == {"dtype": "auto", "tp_size": 4, "dp_size": 4, "enable_dp_attention": True,
                    "enable_ar_fusion": True, "moe_dispatch_fp4": False, "cuda_graph_max_bs": 0}
