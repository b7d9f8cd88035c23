"""Regenerate the tiny byte-level BPE tokenizer shipped in minimax_jax/assets/tiny_tokenizer/.

    python scripts/make_tiny_tokenizer.py --out minimax_jax/assets/tiny_tokenizer

Training is deterministic (fixed corpus, BPE ties broken by token id), so the output is
byte-identical on every run with the same `tokenizers` version. Layout of the 512 ids:
0-255 the ByteLevel byte alphabet, then BPE merges, then the MiniMax special and markup tokens
in the last 7 ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimax_jax.engine.tokenizer import (  # noqa: E402
    BOS_TOKEN, EOS_TOKEN, MARKUP_TOKENS, MINIMAX_CHAT_TEMPLATE, SPECIAL_TOKENS)

VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 4096

CORPUS = """\
The river town woke slowly on market days. Before the sun cleared the hills, the baker had
already pulled the first loaves from the oven, and the smell of warm bread drifted down the
narrow street toward the water. Fishermen mended their nets on the stone steps while children
ran between the stalls, counting the apples and asking the price of everything they saw.

A small machine can learn a surprising amount from a small amount of text. It reads the words
one piece at a time, guesses what should come next, and changes itself a little whenever the
guess is wrong. After many thousands of such steps the guesses become better, although the
machine never sees the world that the words describe.

When you ask a question, a good assistant first thinks about what you really want to know.
It may break the problem into smaller parts, check each part, and only then write the answer.
If a tool would help, such as a calculator or a search over documents, the assistant can call
that tool, read the result, and continue the conversation with the new information.

The weather changed in the afternoon. Clouds came in from the west, the wind turned cold, and
the first drops of rain fell on the canvas roofs of the market. People hurried to pack their
goods into wooden boxes and carry them back to the carts. By evening the street was empty and
quiet, and only the sound of the rain on the water remained.

Numbers are words too: one, two, three, four, five, six, seven, eight, nine, and ten. A list
of 12 items costs 3.50 each, so the total is 42 dollars. Time is written as 09:30 or 14:45,
and a date such as 2024-05-17 keeps the year first so that the order is easy to sort.

Good software is written for people as much as for computers. Names should say what a thing
does, functions should be short, and every test should describe the behaviour it protects.
When something fails, the error message should explain what went wrong and where, in a single
line that a tired person can read at the end of a long day.

She opened the old letter carefully. The paper was thin and yellow, and the ink had faded to
a soft brown, but the words were still clear. It told the story of a long journey across the
mountains, of friends who helped along the way, and of a small house by the sea where the
writer hoped, one day, to return and rest.

In the garden behind the school, the students planted beans, carrots, and tall yellow flowers.
Every morning they measured how much each plant had grown and wrote the numbers in a notebook.
Some plants grew quickly in the sun, others waited in the shade, and a few were eaten by birds
before anyone noticed. The teacher said that every garden teaches patience.

Trains leave the central station every twenty minutes. Passengers buy their tickets at the
machine near the entrance, find their platform on the large board, and wait with coffee in
their hands. The journey to the coast takes about two hours, and on a clear day you can see
the mountains on one side and the sea on the other.
"""


def train(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    added = len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    trained = tok.get_vocab_size()
    if trained != vocab_size - added:
        raise RuntimeError(f"corpus too small: BPE reached {trained} tokens, wanted {vocab_size - added}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, tok.token_to_id(BOS_TOKEN))])
    assert tok.get_vocab_size() == vocab_size
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": MINIMAX_CHAT_TEMPLATE,
    }


def write(out: Path) -> None:
    tokenizer_json = train().to_str(pretty=True) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write tokenizer files into")
    write(parser.parse_args().out)


if __name__ == "__main__":
    main()
