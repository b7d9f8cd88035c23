"""OpenAI wire format: request and response models, the sampling-parameter mapping, and the
MiniMax reasoning splitter (`<think>...</think>` -> reasoning_content)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from minimax_jax.engine.tokenizer import THINK_END, THINK_START, stop_holdback

if TYPE_CHECKING:
    from minimax_jax.engine.async_engine import StreamDelta

MAX_TOP_LOGPROBS = 20            # the sampler returns at most 20 alternatives per token
MAX_CHOICES = 16                 # n: each choice is a request of its own
UNSET = lambda v: v is None      # noqa: E731  (exclude_if predicate: drop optional extensions)


class OpenAIError(Exception):
    """A request the server refuses, rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests ------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by completions and chat completions (unknown fields are ignored)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                     # extension
    min_p: float | None = None                   # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None      # extension
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False                     # extension
    skip_special_tokens: bool = True             # extension
    return_token_ids: bool = False               # extension: token ids in every choice
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> OpenAIError | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_new_tokens: int, top_logprobs: int, choice: int = 0) -> dict[str, Any]:
        """SamplingParams fields of the choice-th of n choices (a given seed counts up from the
        first, so the choices differ); None means the engine's default."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return {
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "seed": None if self.seed is None else (self.seed + choice) % 2**32,
            "stop": [s for s in stops if s],
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "top_logprobs_num": top_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "logit_bias": self.logit_bias,
        }


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)        # 0 with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's tokens come back with their log-probabilities."""
        return self.echo and self.logprobs is not None

    def unsupported(self) -> OpenAIError | None:
        if self.max_tokens == 0 and not self.echo:
            return OpenAIError(400, "max_tokens 0 needs echo (the prompt is all that comes back)", "max_tokens")
        if self.suffix:
            return OpenAIError(400, "suffix is not supported yet", "suffix")
        if self.best_of not in (None, 1):
            return OpenAIError(400, "best_of > 1 is not supported yet", "best_of")
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids: one, or a batch (a list of strings or of id lists)."""
        prompt = self.prompt
        batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = list(prompt) if batch else [prompt]
        if any(not p for p in prompts):
            raise OpenAIError(400, "the prompt is empty", "prompt")
        return prompts


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if message["role"] == "developer":           # OpenAI's newer name for the system role
            message["role"] = "system"
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> OpenAIError | None:
        if self.top_logprobs and not self.logprobs:
            return OpenAIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if self.tool_choice not in (None, "auto", "none"):
            return OpenAIError(400, "tool_choice other than 'auto' or 'none' is not supported yet", "tool_choice")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return OpenAIError(400, "response_format other than text is not supported yet", "response_format")
        return super().unsupported()

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model may call (tool_choice "none" offers none), as plain dicts."""
        if self.tools and self.tool_choice != "none":
            return [t.model_dump(exclude_none=True) for t in self.tools]
        return None

    def template_inputs(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        return [m.for_template() for m in self.messages], self.offered_tools()


# field names of every request model: what an error `param` path may contain
REQUEST_FIELDS = frozenset().union(*(m.model_fields for m in (
    CompletionRequest, ChatCompletionRequest, ChatMessage, ContentPart, ToolDefinition,
    FunctionDefinition, StreamOptions)))


# -- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int          # prompt tokens whose keys and values the prefix cache held


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, outs: list["StreamDelta"], choices_per_prompt: int = 1) -> "UsageInfo":
        """The usage of a response's choices from their last `StreamDelta`s, prompt by prompt,
        choices_per_prompt (n) each: a prompt counts once, as OpenAI counts it."""
        firsts = outs[::choices_per_prompt]
        prompt, completion = sum(o.prompt_tokens for o in firsts), sum(o.completion_tokens for o in outs)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(o.cached_tokens for o in firsts)))


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []              # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=UNSET)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=UNSET)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(None, exclude_if=UNSET)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, exclude_if=UNSET)
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=UNSET)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=UNSET)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = Field(None, exclude_if=UNSET)


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=UNSET)
    content: str | None = Field(None, exclude_if=UNSET)
    reasoning_content: str | None = Field(None, exclude_if=UNSET)
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=UNSET)   # each with its "index"


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=UNSET)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = Field(None, exclude_if=UNSET)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minimax-jax"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_finish_reason(finish: dict | None) -> str | None:
    """Engine finish reasons are {'type': 'stop' | 'length' | 'abort', ...}."""
    return None if finish is None else finish.get("type", "abort")


# -- reasoning -----------------------------------------------------------------------------------

class ReasoningSplitter:
    """Splits MiniMax output into reasoning (before `</think>`) and content, incrementally.

    The chat template's generation prompt already opens `<think>`, so output starts inside the
    reasoning; a leading `<think>` is dropped too. Reasoning is stripped of surrounding
    whitespace and content of leading whitespace. Feeding the text in pieces gives exactly what
    feeding it at once gives: text that may still be the start of a tag, or reasoning whitespace
    that may turn out to be trailing, is held back until it is decided.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._phase = "start"            # start -> reasoning -> content
        self._reasoning_started = False
        self._content_started = False

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """Returns the (reasoning, content) text that piece completes."""
        self._buf += piece
        if self._phase == "start" and not self._open(final):
            return "", ""
        reasoning = self._reasoning(final) if self._phase == "reasoning" else ""
        content = self._content() if self._phase == "content" else ""
        return reasoning, content

    def _open(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if not final and THINK_START.startswith(head) and head != THINK_START:
            return False                 # may still become "<think>"
        self._buf = head[len(THINK_START):] if head.startswith(THINK_START) else head
        self._phase = "reasoning"
        return True

    def _reasoning(self, final: bool) -> str:
        if not self._reasoning_started:
            self._buf = self._buf.lstrip()
        end = self._buf.find(THINK_END)
        if end >= 0:
            out, self._buf, self._phase = self._buf[:end].rstrip(), self._buf[end + len(THINK_END):], "content"
        elif final:
            out, self._buf = self._buf.rstrip(), ""
        else:
            undecided = stop_holdback(self._buf, [THINK_END])
            out = self._buf[:len(self._buf) - undecided].rstrip()
            self._buf = self._buf[len(out):]
        self._reasoning_started |= bool(out)
        return out

    def _content(self) -> str:
        out = self._buf if self._content_started else self._buf.lstrip()
        self._buf = ""
        self._content_started |= bool(out)
        return out


class ThinkPrefixer:
    """sglang's "minimax-append-think": the whole output stays the content, with the `<think>`
    that the chat template's generation prompt opened put back in front, so a client that sends
    the turn back in its history keeps the reasoning there, as MiniMax recommends for its models;
    no reasoning_content. `feed` as `ReasoningSplitter.feed`."""

    def __init__(self) -> None:
        self._started = False

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        if self._started:
            return "", piece
        self._started = True
        return "", THINK_START + piece


REASONING_PARSERS = {"minimax": ReasoningSplitter, "minimax-append-think": ThinkPrefixer}
