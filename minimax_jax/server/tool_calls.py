"""MiniMax-M2 tool calls in chat output -> OpenAI `tool_calls` (sglang's `minimax-m2` parser).

The model calls functions the way the chat template shows it (`engine.tokenizer`):

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

A block may hold several invokes. Parameter values are text; a parameter whose JSON schema type
is "string" keeps its text, any other is read as JSON where it parses (numbers, booleans,
objects, arrays), as the template renders non-string arguments with `tojson`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from minimax_jax.engine.tokenizer import TOOL_CALL_END, TOOL_CALL_START, stop_holdback

TOOL_CALL_PARSERS = ("minimax-m2",)
_INVOKE = re.compile(r'<invoke name="([^"]*)">(.*?)</invoke>', re.S)
_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.S)


def parameter_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{function name: {parameter name: its JSON schema}} of the request's tools."""
    schemas = {}
    for tool in tools or []:
        function = tool.get("function", tool)
        schemas[function["name"]] = (function.get("parameters") or {}).get("properties") or {}
    return schemas


def parse_block(block: str, schemas: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The OpenAI tool calls of one block's text (between the tool-call tags)."""
    calls = []
    for name, body in _INVOKE.findall(block):
        properties = schemas.get(name, {})
        arguments = {key: _value(raw, properties.get(key)) for key, raw in _PARAMETER.findall(body)}
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls


def _value(raw: str, schema: dict[str, Any] | None) -> Any:
    kinds = (schema or {}).get("type")
    if kinds == "string" or (isinstance(kinds, list) and "string" in kinds):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class ToolCallSplitter:
    """Splits chat content into text and complete tool calls, incrementally.

    Text that may still be the start of a tool-call tag is held back until it is decided, and a
    block's calls come out once its closing tag arrives, so feeding the text in pieces gives what
    feeding it at once gives (call ids aside). A block still open at the end (the output ran out
    of tokens) comes back as text, tags included: nothing is lost.
    """

    def __init__(self, tools: list[dict[str, Any]] | None):
        self._schemas = parameter_schemas(tools)
        self._buf = ""
        self._inside = False

    def feed(self, piece: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """Returns the (text, tool calls) that piece completes."""
        self._buf += piece
        text, calls = "", []
        while True:
            if not self._inside:
                start = self._buf.find(TOOL_CALL_START)
                if start < 0:
                    undecided = 0 if final else stop_holdback(self._buf, [TOOL_CALL_START])
                    cut = len(self._buf) - undecided
                    text, self._buf = text + self._buf[:cut], self._buf[cut:]
                    return text, calls
                text, self._buf, self._inside = text + self._buf[:start], self._buf[start + len(TOOL_CALL_START):], True
            end = self._buf.find(TOOL_CALL_END)
            if end < 0:
                if final:
                    text, self._buf = text + TOOL_CALL_START + self._buf, ""
                return text, calls
            calls += parse_block(self._buf[:end], self._schemas)
            self._buf, self._inside = self._buf[end + len(TOOL_CALL_END):], False


def split_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> tuple[str, list[dict[str, Any]]]:
    """(text, tool calls) of a whole output."""
    return ToolCallSplitter(tools).feed(text, final=True)
