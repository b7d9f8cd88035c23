"""MiniMax-M2 tool calls parsed out of chat output (`--tool-call-parser minimax-m2`): the parser
on its own, then through the app with the openai client, over a stub engine that replays a
scripted output (a random tiny model would never write a tool call)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from minimax_jax.engine.async_engine import StreamDelta
from minimax_jax.engine.tokenizer import Tokenizer
from minimax_jax.server.app import ServerConfig, create_app
from minimax_jax.server.metrics import ServerMetrics
from minimax_jax.server.tool_calls import ToolCallSplitter, split_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "zip": {"type": "string"}, "units": {"type": ["string", "null"]}}}}}
CALLS = ('<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
         '<parameter name="days">3</parameter>\n<parameter name="zip">75001</parameter>\n</invoke>\n'
         '<invoke name="search">\n<parameter name="filters">{"tags": ["a", "b"], "open": true}</parameter>\n'
         '<parameter name="query">rain gear</parameter>\n</invoke>\n</minimax:tool_call>')
OUTPUT = "Checking both.\n" + CALLS


def arguments(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_calls_take_their_schema_types_and_unknown_parameters_read_as_json_where_they_parse():
    text, calls = split_tool_calls(OUTPUT, [WEATHER])
    assert text == "Checking both.\n"
    assert arguments(calls) == [("get_weather", {"city": "Paris", "days": 3, "zip": "75001"}),
                                ("search", {"filters": {"tags": ["a", "b"], "open": True}, "query": "rain gear"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("text", [OUTPUT, OUTPUT + "\ntrailing words", "no calls, a < sign and <minimax:tool",
                                  "cut off: <minimax:tool_call>\n<invoke name=\"get_weather\">\n<param"])
def test_splitting_is_the_same_for_any_chunking_and_an_unclosed_block_stays_text(text):
    whole_text, whole_calls = split_tool_calls(text, [WEATHER])
    for size in (1, 2, 3, 7):
        splitter, got_text, got_calls = ToolCallSplitter([WEATHER]), "", []
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for i, piece in enumerate(pieces):
            t, c = splitter.feed(piece, final=i == len(pieces) - 1)
            got_text, got_calls = got_text + t, got_calls + c
        assert (got_text, arguments(got_calls)) == (whole_text, arguments(whole_calls))
    if "</minimax:tool_call>" not in text:
        assert whole_text == text and whole_calls == []         # nothing lost


class ScriptedEngine:
    """What the app needs of an AsyncEngine, replaying `output` in pieces of 5 characters."""

    def __init__(self, output: str):
        self.output, self.tokenizer = output, Tokenizer.tiny()
        self.is_alive, self.context_length, self.loaded_from = True, 512, "scripted"

    def make_request(self, input_ids, sampling_params, rid, logprob_start_len=-1):
        return SimpleNamespace(rid=rid, prompt_ids=input_ids)

    async def generate_stream(self, req):
        pieces = [self.output[i:i + 5] for i in range(0, len(self.output), 5)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield StreamDelta(piece, [0], [0.0], [], len(req.prompt_ids), i + 1, {"type": "stop"} if last else None)

    async def generate(self, req):
        parts = [d async for d in self.generate_stream(req)]
        return StreamDelta("".join(p.text for p in parts), [0] * len(parts), [0.0] * len(parts), [],
                           len(req.prompt_ids), len(parts), parts[-1].finish_reason)


def chat(output: str, parser: str | None, **request):
    app = create_app(ScriptedEngine(output), ServerMetrics(), ServerConfig("tiny", tool_call_parser=parser))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http)
            messages = [{"role": "user", "content": "Weather in Paris?"}]
            if request.pop("stream", False):
                stream = await client.chat.completions.create(model="tiny", messages=messages, stream=True, **request)
                return [chunk async for chunk in stream]
            return await client.chat.completions.create(model="tiny", messages=messages, **request)
    return asyncio.run(run())


def test_the_app_answers_tool_calls_with_finish_reason_tool_calls():
    reply = chat(OUTPUT, "minimax-m2", tools=[WEATHER]).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content == "Checking both."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3, "zip": "75001"}),
        ("search", {"filters": {"tags": ["a", "b"], "open": True}, "query": "rain gear"})]
    # without the parser, without tools offered, or with tool_choice "none" the text is the content
    for kwargs in ({"parser": None, "tools": [WEATHER]}, {"parser": "minimax-m2"},
                   {"parser": "minimax-m2", "tools": [WEATHER], "tool_choice": "none"}):
        plain = chat(OUTPUT, kwargs.pop("parser"), **kwargs).choices[0]
        assert plain.message.content == OUTPUT and not plain.message.tool_calls and plain.finish_reason == "stop"


def test_streamed_tool_calls_come_whole_with_their_index_and_the_text_around_them():
    chunks = chat(OUTPUT + " Done.", "minimax-m2", tools=[WEATHER], stream=True)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather"), (1, "search")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3, "zip": "75001"}
    assert "".join(d.content or "" for d in deltas) == "Checking both.\n Done."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
