from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from minimax_jax.config import preset
from minimax_jax.engine.tokenizer import (
    MARKUP_TOKENS, MINIMAX_CHAT_TEMPLATE, SPECIAL_TOKENS, TINY_TOKENIZER_DIR, IncrementalDecoder,
    Tokenizer, find_stop, stop_holdback)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_tiny_tokenizer.py"

ASCII_TEXT = "The quick brown fox jumps over the lazy dog.\n\tTabs, 123 numbers & symbols: {}[]()!?"
UNICODE_TEXT = "日本語のテキスト 中文 한국어 — café naïve Ωμέγα עברית 👩‍👩‍👧‍👦 🇯🇵 🎉🔥 e\u0301"
EMOJI_TEXT = "🎉🔥👍🏽 ok 🧑‍🚀🚀 日本 🇫🇷🇩🇪 ✨" * 3
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER_DIR / "tokenizer.json"))


# --- vocabulary and round trips ---------------------------------------------------------------

def test_tiny_vocab_size_matches_tiny_model_preset(tok: Tokenizer) -> None:
    assert tok.vocab_size == preset("tiny").vocab_size == 512


@pytest.mark.parametrize("text", [ASCII_TEXT, UNICODE_TEXT, EMOJI_TEXT, "", " ", "\n\n", "\x00\x7f"])
def test_any_text_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_and_markup_tokens_encode_to_single_ids(tok: Tokenizer) -> None:
    for token in SPECIAL_TOKENS + MARKUP_TOKENS:
        ids = tok.encode(token)
        assert len(ids) == 1 and tok.id_to_token(ids[0]) == token
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS] == list(range(505, 512))
    assert (tok.bos_token_id, tok.eos_token_id) == (505, 507)


def test_special_tokens_inside_text_are_recognised(tok: Tokenizer) -> None:
    ids = tok.encode("hi[e~[<think>")
    assert ids[-2:] == [tok.eos_token_id, tok.token_to_id("<think>")]


def test_add_special_tokens_prepends_bos(tok: Tokenizer) -> None:
    assert tok.encode("hello", add_special_tokens=True) == [tok.bos_token_id] + tok.encode("hello")


def test_skip_special_tokens_drops_turn_markers_but_keeps_markup(tok: Tokenizer) -> None:
    ids = tok.encode("]~!b[]~b]ai\n<think>\nhm</think>ok[e~[")
    assert tok.decode(ids, skip_special_tokens=True) == "ai\n<think>\nhm</think>ok"


# --- generated asset --------------------------------------------------------------------------

def test_generator_is_deterministic_and_matches_shipped_asset(tmp_path: Path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:  # separate processes, so Rust's per-process hash seeds differ
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, cwd=tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        first, second = ((o / name).read_bytes() for o in outs)
        assert first == second, f"{name} differs between runs"
        assert first == (TINY_TOKENIZER_DIR / name).read_bytes(), \
            f"shipped {name} is stale: run scripts/make_tiny_tokenizer.py --out {TINY_TOKENIZER_DIR}"


def test_shipped_asset_is_small_and_config_carries_template() -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (TINY_TOKENIZER_DIR / name).stat().st_size < 200_000
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("]~!b[", "[e~[")
    assert config["chat_template"] == MINIMAX_CHAT_TEMPLATE


# --- transformers as oracle -------------------------------------------------------------------

@pytest.mark.parametrize("text", [ASCII_TEXT, UNICODE_TEXT, EMOJI_TEXT, "]~!b[]~b]user\nhi[e~[\n<think>\n",
                                  "  leading spaces and trailing   "])
def test_ids_match_transformers_fast_tokenizer(tok: Tokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok.encode(text, add_special_tokens=False))


def test_chat_template_matches_transformers_rendering(tok: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    expected = hf.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]) == expected


# --- chat template ----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]


def test_chat_template_renders_system_user_assistant(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert text == "]~!b[]~b]system\nYou are terse.[e~[\n]~b]user\nHi[e~[\n]~b]ai\nHello.[e~[\n"


def test_generation_prompt_opens_ai_turn_with_think(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATION[:2])
    assert text == "]~!b[]~b]system\nYou are terse.[e~[\n]~b]user\nHi[e~[\n]~b]ai\n<think>\n"


def test_no_system_message_means_no_system_turn(tok: Tokenizer) -> None:
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "]~!b[]~b]user\nHi[e~[\n]~b]ai\n<think>\n"


def test_list_of_text_parts_content_is_concatenated(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "]~!b[]~b]user\nHello there[e~[\n"


def test_tool_call_and_tools_render_minimax_xml(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Need the tool.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=[WEATHER_TOOL])
    schema = json.dumps(WEATHER_TOOL["function"], ensure_ascii=False)
    assert text == (
        "]~!b[]~b]system\n# Tools\nYou may call the functions described below, one JSON schema per line.\n"
        f"<tools>\n{schema}\n</tools>\nTo call functions, reply with:\n<minimax:tool_call>\n"
        '<invoke name="FUNCTION_NAME">\n<parameter name="ARGUMENT_NAME">VALUE</parameter>\n</invoke>\n'
        "</minimax:tool_call>[e~[\n"
        "]~b]user\nWeather?[e~[\n"
        "]~b]ai\n<think>\nNeed the tool.\n</think>\n\nChecking.\n<minimax:tool_call>\n"
        '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
        '<parameter name="days">2</parameter>\n</invoke>\n</minimax:tool_call>[e~[\n'
        "]~b]tool\nsunny[e~[\n"
        "]~b]ai\n<think>\n")


def test_tools_append_to_existing_system_turn(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATION[:2], tools=[WEATHER_TOOL])
    assert text.startswith("]~!b[]~b]system\nYou are terse.\n\n# Tools\n")
    assert text.count("]~b]system") == 1


def test_unsupported_role_and_part_type_raise(tok: Tokenizer) -> None:
    with pytest.raises(TemplateError, match="unsupported message role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TemplateError, match="only text content parts"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_encode_chat_has_exactly_one_bos(tok: Tokenizer) -> None:
    ids = tok.encode_chat(CONVERSATION)
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATION))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


# --- loading ----------------------------------------------------------------------------------

def test_missing_tokenizer_json_names_path_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value) and "\n" not in str(err.value)


def _asset_copy(tmp_path: Path, config: dict | None) -> Path:
    (tmp_path / "tokenizer.json").write_bytes((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_chat_template_list_form_prefers_default(tmp_path: Path) -> None:
    config = {"eos_token": {"content": "[e~["}, "chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}"}]}
    tok = Tokenizer.from_dir(_asset_copy(tmp_path, config))
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    assert tok.eos_token_id == 507


def test_missing_config_falls_back_to_minimax_defaults(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_asset_copy(tmp_path, None))
    assert tok.chat_template == MINIMAX_CHAT_TEMPLATE
    assert (tok.bos_token_id, tok.eos_token_id) == (505, 507)


# --- streaming --------------------------------------------------------------------------------

def test_incremental_decoder_streams_emoji_without_replacement_chars(tok: Tokenizer) -> None:
    ids = tok.encode(EMOJI_TEXT + "[e~[")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test must split characters
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1] == ""  # nothing left once the text is complete


def test_incremental_decoder_skips_special_tokens_when_asked(tok: Tokenizer) -> None:
    ids = tok.encode("]~b]ai\n日本🎉[e~[")
    decoder = IncrementalDecoder(tok, skip_special_tokens=True)
    text = "".join(decoder.feed(i) for i in ids) + decoder.flush()
    assert text == "ai\n日本🎉"


def test_incremental_decoder_flush_returns_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("a🎉")
    decoder = IncrementalDecoder(tok)
    streamed = "".join(decoder.feed(i) for i in ids[:-1])
    assert streamed == "a" and decoder.flush() == tok.decode(ids[:-1])[1:]


def test_find_stop_returns_earliest_match() -> None:
    assert find_stop("abc</think>def[e~[", ["[e~[", "</think>"]) == 3
    assert find_stop("nothing here", ["STOP", ""]) == -1


@pytest.mark.parametrize(("text", "held"), [
    ("hello </thi", 5), ("hello <", 1), ("hello", 0), ("</think", 7), ("ab[e~", 3), ("a[e~[b", 0), ("[[", 1),
])
def test_stop_holdback_counts_possible_stop_prefix(text: str, held: int) -> None:
    assert stop_holdback(text, ["</think>", "[e~[", ""]) == held
