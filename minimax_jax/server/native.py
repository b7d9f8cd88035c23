"""sglang's native wire format: `POST /generate` and `GET /get_model_info`.

A request gives `text` (a string or a list of them) or `input_ids` (a list of ids or a list of
such lists) and `sampling_params` in sglang's names (`max_new_tokens`, `temperature`, `top_p`,
`top_k`, `min_p`, `stop`, `stop_token_ids`, `ignore_eos`, ...: `engine.sampling.SamplingParams`),
one dict for all prompts or one per prompt. A result is `{"text", "output_ids", "meta_info":
{"id", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"}}` (a list of them
for a batch); streamed, each `data:` event carries one request's text and ids so far, as sglang's
do (a batch's requests interleave, each event with its `index`), and the stream ends with
`data: [DONE]`. `return_logprob` adds `meta_info.output_token_logprobs`,
`[logprob, token id, text or null]` per output token (text with `return_text_in_logprobs`), and
with `logprob_start_len` >= 0 `meta_info.input_token_logprobs`, the same for each prompt token
from that position (the logprob of position 0 is null), and with `top_logprobs_num`
`input_top_logprobs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from minimax_jax.server.protocol import OpenAIError

if TYPE_CHECKING:
    from minimax_jax.engine.async_engine import StreamDelta


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")      # sglang clients send fields this server has no use for

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    logprob_start_len: int | None = None
    rid: str | list[str] | None = None
    image_data: Any = None
    lora_path: Any = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        if (self.text is None) == (self.input_ids is None):
            raise OpenAIError(400, "give exactly one of text and input_ids", "text")
        if self.text is not None:
            prompts = [self.text] if isinstance(self.text, str) else list(self.text)
        elif self.input_ids and isinstance(self.input_ids[0], list):
            prompts = list(self.input_ids)
        else:
            prompts = [self.input_ids]
        if not prompts or any(not p for p in prompts):
            raise OpenAIError(400, "the prompt is empty", "text" if self.text is not None else "input_ids")
        return prompts

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or bool(self.input_ids and isinstance(self.input_ids[0], list))

    def per_prompt(self, n: int) -> list[tuple[dict[str, Any], str | None]]:
        """(sampling params, rid) of each of n prompts."""
        params = self.sampling_params if isinstance(self.sampling_params, list) else [self.sampling_params or {}] * n
        rids = self.rid if isinstance(self.rid, list) else [self.rid] * n
        if len(params) != n or len(rids) != n:
            raise OpenAIError(400, f"sampling_params and rid lists must have one entry per prompt ({n})",
                              "sampling_params" if len(params) != n else "rid")
        if n > 1 and any(r is not None for r in rids) and len(set(rids)) != n:
            raise OpenAIError(400, "the rids of a batch must differ", "rid")
        return list(zip(params, rids))

    def unsupported(self) -> OpenAIError | None:
        if self.image_data is not None:
            return OpenAIError(400, "image_data: this model takes text only", "image_data")
        if self.lora_path is not None:
            return OpenAIError(400, "LoRA adapters are not supported", "lora_path")
        if self.logprob_start_len is not None and self.logprob_start_len < -1:
            return OpenAIError(400, "logprob_start_len must be -1 (output tokens only) or a prompt position >= 0",
                               "logprob_start_len")
        return None

    @property
    def prompt_logprobs_from(self) -> int:
        """The engine request's logprob_start_len: -1 unless return_logprob asks from a position."""
        return self.logprob_start_len if self.return_logprob and self.logprob_start_len is not None else -1


class GenerateResult(BaseModel):
    text: str
    output_ids: list[int]
    meta_info: dict[str, Any]
    index: int = 0


def generate_result(rid: str, text: str, output_ids: list[int], last: "StreamDelta",
                    logprobs: list[list[Any]] | None, index: int = 0,
                    input_logprobs: dict[str, list] | None = None) -> GenerateResult:
    """The result so far of one request, its numbers from its latest delta; input_logprobs:
    the prompt's entries of meta_info (`NativeServing._input_logprobs`)."""
    meta: dict[str, Any] = {"id": rid, "prompt_tokens": last.prompt_tokens,
                            "completion_tokens": last.completion_tokens, "cached_tokens": last.cached_tokens,
                            "finish_reason": last.finish_reason}
    if logprobs is not None:
        meta["output_token_logprobs"] = logprobs
    meta.update(input_logprobs or {})
    return GenerateResult(text=text, output_ids=output_ids, meta_info=meta, index=index)
