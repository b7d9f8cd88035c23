"""Tokenizer: a thin wrapper over a HF `tokenizers` tokenizer.json plus the MiniMax chat format.

MiniMax-M2.5 chat format (rendered by MINIMAX_CHAT_TEMPLATE):

    ]~!b[                                   BOS, once at the start
    ]~b]system\n{system}[e~[\n              only when messages[0] is a system message or tools are given
    ]~b]user\n{content}[e~[\n
    ]~b]ai\n{content}[e~[\n                 assistant turns use the role name "ai"
    ]~b]tool\n{result}[e~[\n
    ]~b]ai\n<think>\n                       the generation prompt (the model reasons first)

Tools (OpenAI format) are listed inside the system turn, one JSON schema per line between
<tools> and </tools>. Assistant tool calls render as

    <minimax:tool_call>\n<invoke name="f">\n<parameter name="k">v</parameter>\n</invoke>\n</minimax:tool_call>

(string values verbatim, other values as JSON). An assistant `reasoning_content` renders as
`<think>\n{reasoning}\n</think>\n\n` before the content.

Streaming helpers: IncrementalDecoder (ids -> newly completed text), find_stop and
stop_holdback (how much trailing text to withhold because it may begin a stop string).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

BOS_TOKEN = "]~!b["
TURN_START = "]~b]"
EOS_TOKEN = "[e~["
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<minimax:tool_call>"
TOOL_CALL_END = "</minimax:tool_call>"

# Structural tokens: dropped by decode(skip_special_tokens=True).
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, TURN_START, EOS_TOKEN)
# Markup tokens: single ids, but kept by skip_special_tokens so reasoning/tool-call parsers see them.
MARKUP_TOKENS: tuple[str, ...] = (THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END)

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

MINIMAX_CHAT_TEMPLATE = r"""
{#- minimax-jax default MiniMax-M2.5 chat template. Every output piece is an expression so the
    template's own whitespace never reaches the prompt. -#}
{%- macro render_content(content) -%}
  {%- if content is none -%}
  {%- elif content is string -%}
    {{- content -}}
  {%- else -%}
    {%- for part in content -%}
      {%- if part.type != 'text' -%}
        {{- raise_exception('only text content parts are supported, got type ' ~ part.type) -}}
      {%- endif -%}
      {{- part.text -}}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro render_tools(tools) -%}
  {{- '# Tools\nYou may call the functions described below, one JSON schema per line.\n<tools>\n' -}}
  {%- for tool in tools -%}
    {{- (tool.function if tool.function is defined else tool) | tojson -}}
    {{- '\n' -}}
  {%- endfor -%}
  {{- '</tools>\nTo call functions, reply with:\n<minimax:tool_call>\n<invoke name="FUNCTION_NAME">\n' -}}
  {{- '<parameter name="ARGUMENT_NAME">VALUE</parameter>\n</invoke>\n</minimax:tool_call>' -}}
{%- endmacro -%}
{%- macro render_tool_calls(tool_calls) -%}
  {{- '<minimax:tool_call>\n' -}}
  {%- for call in tool_calls -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {%- if fn.arguments is not mapping -%}
      {{- raise_exception('tool call arguments must be a JSON object') -}}
    {%- endif -%}
    {{- '<invoke name="' ~ fn.name ~ '">\n' -}}
    {%- for key, value in fn.arguments.items() -%}
      {{- '<parameter name="' ~ key ~ '">' -}}
      {{- value if value is string else value | tojson -}}
      {{- '</parameter>\n' -}}
    {%- endfor -%}
    {{- '</invoke>\n' -}}
  {%- endfor -%}
  {{- '</minimax:tool_call>' -}}
{%- endmacro -%}
{{- ']~!b[' -}}
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == 'system' -%}
  {{- ']~b]system\n' ~ render_content(messages[0].content) -}}
  {%- if tools -%}
    {{- '\n\n' ~ render_tools(tools) -}}
  {%- endif -%}
  {{- '[e~[\n' -}}
  {%- set ns.start = 1 -%}
{%- elif tools -%}
  {{- ']~b]system\n' ~ render_tools(tools) ~ '[e~[\n' -}}
{%- endif -%}
{%- for message in messages[ns.start:] -%}
  {%- if message.role in ['system', 'user', 'tool'] -%}
    {{- ']~b]' ~ message.role ~ '\n' ~ render_content(message.content) ~ '[e~[\n' -}}
  {%- elif message.role == 'assistant' -%}
    {{- ']~b]ai\n' -}}
    {%- if message.reasoning_content -%}
      {{- '<think>\n' ~ message.reasoning_content ~ '\n</think>\n\n' -}}
    {%- endif -%}
    {%- set text = render_content(message.content) -%}
    {{- text -}}
    {%- if message.tool_calls -%}
      {%- if text -%}
        {{- '\n' -}}
      {%- endif -%}
      {{- render_tool_calls(message.tool_calls) -}}
    {%- endif -%}
    {{- '[e~[\n' -}}
  {%- else -%}
    {{- raise_exception('unsupported message role: ' ~ message.role) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- ']~b]ai\n<think>\n' -}}
{%- endif -%}
""".strip()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    # jinja's builtin tojson HTML-escapes <, >, & and ' which would corrupt prompts.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _select_template(value: Any) -> str | None:
    """chat_template may be a string or a list of {name, template}; prefer the one named 'default'."""
    if value is None or isinstance(value, str):
        return value
    by_name = {entry["name"]: entry["template"] for entry in value}
    return by_name.get("default", value[0]["template"] if value else None)


def _normalize_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    call = copy.deepcopy(call)
    fn = call.get("function", call)
    args = fn.get("arguments")
    if args is None or args == "":
        fn["arguments"] = {}
    elif isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call {fn.get('name')!r} arguments are not valid JSON: {e}") from None
    return call


def _normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parse OpenAI-style JSON-string tool call arguments into dicts for the template."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_normalize_tool_call(c) for c in message["tool_calls"]]
        out.append(message)
    return out


class Tokenizer:
    """Encode/decode text and render MiniMax chat prompts."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = BOS_TOKEN,
                 eos_token: str | None = EOS_TOKEN, chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template or MINIMAX_CHAT_TEMPLATE
        self.bos_token_id = self._required_id(bos_token, "bos_token")
        self.eos_token_id = self._required_id(eos_token, "eos_token")
        self._template = _jinja_env().from_string(self.chat_template)

    def _required_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{field} {token!r} is not in the tokenizer vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json, plus tokenizer_config.json and chat_template.jinja when present."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_file}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else _select_template(config.get("chat_template")))
        bos = _token_content(config.get("bos_token", _default_if_known(backend, BOS_TOKEN)))
        eos = _token_content(config.get("eos_token", _default_if_known(backend, EOS_TOKEN)))
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=template)

    @classmethod
    def tiny(cls) -> Tokenizer:
        """The 512-token byte-level BPE tokenizer shipped for the tiny model preset."""
        return cls.from_dir(TINY_TOKENIZER_DIR)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """add_special_tokens runs the tokenizer.json post-processor (the tiny one prepends BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=_normalize_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        # The template already writes BOS, so the post-processor must not add another.
        return self.encode(self.apply_chat_template(messages, tools, add_generation_prompt))


def _default_if_known(backend: tokenizers.Tokenizer, token: str) -> str | None:
    return token if backend.token_to_id(token) is not None else None


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, emitting only characters that are complete.

    Byte-level tokens can end inside a multi-byte UTF-8 character; such text decodes with a
    trailing U+FFFD and is held back until a later token completes it. The concatenation of all
    feed() results plus flush() equals tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # Text of ids[prefix:read] has been emitted; ids[read:] are pending.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending_text(self) -> tuple[str, str]:
        done = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        return done, full

    def feed(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly '')."""
        self.ids.append(token_id)
        done, full = self._pending_text()
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(done):]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes as U+FFFD)."""
        done, full = self._pending_text()
        self._prefix = self._read = len(self.ids)
        return full[len(done):]


def find_stop(text: str, stops: Iterable[str]) -> int:
    """Index of the earliest occurrence of any (non-empty) stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits, default=-1)


def stop_holdback(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters of text to withhold because they could begin a stop string.

    Returns the length of the longest suffix of text that is a proper prefix of some stop string.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
