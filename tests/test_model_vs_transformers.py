"""The JAX model against transformers' MiniMaxM2ForCausalLM on tiny random checkpoints."""
import numpy as np
import pytest
import torch
import jax.numpy as jnp

from minimax_jax.engine.engine import Engine
from minimax_jax.hf_testing import make_hf_model, save_hf_checkpoint
from minimax_jax.loader import load_model
from minimax_jax.model import StepInput, init_kv_cache

CONFIGS = {
    "gqa4-rope-half": {},
    "mqa-full-rotary": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, rotary_dim=32,
                            num_local_experts=16, num_experts_per_tok=4, num_hidden_layers=3),
    "odd-shapes": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                       rotary_dim=4, num_local_experts=12, num_experts_per_tok=3, intermediate_size=24),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_pair(request, tmp_path_factory):
    hf = make_hf_model(seed=len(request.param), **CONFIGS[request.param])
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, path


def prefill_logits(model, ids: np.ndarray, page_size: int = 8) -> np.ndarray:
    b, t = ids.shape
    pages = -(-t // page_size)
    kv = init_kv_cache(model.cfg, b * pages + 3, page_size, jnp.float32)
    # scatter the pages of each sequence, so the page table is really used
    table = np.random.RandomState(0).permutation(b * pages + 3)[:b * pages].reshape(b, pages)
    step = StepInput(tokens=jnp.asarray(ids, jnp.int32),
                     positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                     valid=jnp.ones((b, t), bool), page_table=jnp.asarray(table, jnp.int32))
    logits, _, _ = model(step, kv)
    return np.asarray(logits)


def test_prefill_logits_match_transformers(hf_pair):
    hf, path = hf_pair
    model = load_model(path, dtype=jnp.float32)
    ids = np.random.RandomState(1).randint(0, hf.config.vocab_size, (2, 21))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = prefill_logits(model, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


# cudnn: jax.nn's XLA implementation here; pallas: the decode kernel under Pallas's interpreter
@pytest.mark.parametrize("attention_backend,decode_backend", [("xla", "xla"), ("cudnn", "pallas")])
def test_greedy_decode_matches_transformers_generate(hf_pair, attention_backend, decode_backend):
    hf, path = hf_pair
    prompt = np.random.RandomState(2).randint(0, hf.config.vocab_size, (1, 13))
    with torch.no_grad():
        gen = hf.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)
    ref_tokens = gen.sequences[0, prompt.shape[1]:].tolist()
    ref_logprobs = [torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(gen.logits, ref_tokens)]
    # small chunks and pages: the prompt is prefilled in several chunks across page boundaries
    engine = Engine(model_path=str(path), dtype="float32", context_length=64, page_size=4,
                    chunked_prefill_size=16, max_running_requests=4, attention_backend=attention_backend,
                    decode_attention_backend=decode_backend)
    for scheduler in engine.schedulers:
        scheduler.chunk_size = 5
    out = engine.generate(input_ids=prompt[0].tolist(),
                          sampling_params={"max_new_tokens": 32, "temperature": 0.0}, return_logprob=True)
    assert out["output_ids"] == ref_tokens
    ours = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    np.testing.assert_allclose(ours, ref_logprobs, atol=1e-4)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 32}


def test_batched_greedy_equals_each_request_alone(tiny_hf_dir):
    engine = Engine(model_path=str(tiny_hf_dir), dtype="float32", context_length=128, page_size=8,
                    max_running_requests=8)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, 512, n).tolist() for n in (3, 17, 40, 9, 1)]
    params = [{"max_new_tokens": n, "temperature": 0.0} for n in (12, 5, 20, 1, 9)]
    together = engine.generate(input_ids=prompts, sampling_params=params)
    alone = [engine.generate(input_ids=p, sampling_params=s) for p, s in zip(prompts, params)]
    assert [o["output_ids"] for o in together] == [o["output_ids"] for o in alone]
    assert engine.kv_pages_used == 0


def test_prompt_logprobs_match_transformers_across_chunks_and_from_a_start(hf_pair):
    """Prompt logprobs (sglang's logprob_start_len): each prompt token's log-probability given the
    tokens before it, and the top alternatives, equal transformers' log-softmax of the prompt's
    logits; the prompt is prefilled in chunks of 5, scored from position 0 (None there) and from
    position 7 (the prefix cache then gives back only pages before position 6)."""
    hf, path = hf_pair
    prompt = np.random.RandomState(3).randint(0, hf.config.vocab_size, 17).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1).numpy()
    engine = Engine(model_path=str(path), dtype="float32", context_length=64, page_size=4,
                    chunked_prefill_size=16, max_running_requests=4)
    for scheduler in engine.schedulers:
        scheduler.chunk_size = 5
    params = {"max_new_tokens": 0, "temperature": 0.0, "top_logprobs_num": 3}
    whole = engine.generate(input_ids=prompt, sampling_params=params, return_logprob=True, logprob_start_len=0)
    meta = whole["meta_info"]
    assert whole["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    scored = meta["input_token_logprobs"]
    assert [t for _, t, _ in scored] == prompt and scored[0][0] is None and meta["input_top_logprobs"][0] is None
    expected = ref[np.arange(16), prompt[1:]]
    np.testing.assert_allclose([lp for lp, _, _ in scored[1:]], expected, atol=1e-4)
    for position, top in enumerate(meta["input_top_logprobs"][1:]):
        assert [t for _, t, _ in top] == np.argsort(-ref[position])[:3].tolist()
    later = engine.generate(input_ids=prompt, sampling_params={**params, "max_new_tokens": 2}, return_logprob=True,
                            logprob_start_len=7)
    assert later["meta_info"]["cached_tokens"] == 4        # the pages wholly before position 6
    np.testing.assert_allclose([lp for lp, _, _ in later["meta_info"]["input_token_logprobs"]], expected[6:],
                               atol=1e-4)
    assert len(later["output_ids"]) == 2
