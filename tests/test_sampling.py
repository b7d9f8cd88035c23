"""On-device sampling: penalties, filters, seeds; and the bf16 compute path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.engine.engine import Engine
from minimax_jax.engine.sampling import SamplingBatch, SamplingParams, SamplingParamsError, sample, top_k_carrying
from minimax_jax.loader import load_model
from tests.test_model_vs_transformers import prefill_logits


def batch(params, outputs=None, positions=None):
    n = len(params)
    return SamplingBatch.build(params, [7] * n, positions or [3] * n, n, outputs)


def test_presence_and_frequency_penalties_lower_tokens_already_generated():
    logits = jnp.asarray([[0.0, 1.0, 3.0, 2.5]], jnp.float32)
    greedy = SamplingParams(temperature=0.0)
    assert int(sample(logits, batch([greedy], [[2]]))[0][0]) == 2        # no penalty: argmax
    presence = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert int(sample(logits, batch([presence], [[2]]))[0][0]) == 3
    frequency = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    assert int(sample(logits, batch([frequency], [[2]]))[0][0]) == 2     # 3.0 - 0.3 > 2.5
    assert int(sample(logits, batch([frequency], [[2, 2]]))[0][0]) == 3  # 3.0 - 0.6 < 2.5
    assert int(sample(logits, batch([frequency], [[1]]))[0][0]) == 2


def test_top_k_one_and_tiny_top_p_are_greedy_and_min_p_filters():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.standard_normal((6, 50)) * 3, jnp.float32)
    best = np.asarray(jnp.argmax(logits, -1))
    for p in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=1.0, min_p=1.0)):
        tokens = sample(logits, SamplingBatch.build([p] * 6, list(range(6)), [0] * 6, 6))[0]
        np.testing.assert_array_equal(np.asarray(tokens), best)


def test_logprobs_are_the_models_distribution_not_the_tempered_one():
    logits = jnp.asarray([[0.0, 1.0, 2.0]], jnp.float32)
    tokens, logprobs, top_ids, top_values = sample(logits, batch([SamplingParams(temperature=0.5, seed=1, top_logprobs_num=3)]))
    expected = np.log(np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum())
    assert logprobs[0] == pytest.approx(expected[int(tokens[0])], abs=1e-6)
    assert list(np.asarray(top_ids[0, :3])) == [2, 1, 0]


def test_logit_bias_moves_the_draw_not_the_reported_logprobs():
    """OpenAI's logit_bias: +100 makes a token the greedy choice, -100 bans one, per slot; the
    reported logprobs stay the model's."""
    logits = jnp.asarray([[0.0, 1.0, 3.0, 2.5]] * 3, jnp.float32)
    params = [SamplingParams.from_dict({"temperature": 0.0, "logit_bias": {"0": 100}}),
              SamplingParams.from_dict({"temperature": 0.0, "logit_bias": {"2": -100, "1": 5.0}}),
              SamplingParams(temperature=0.0)]
    tokens, logprobs, _, _ = sample(logits, batch(params))
    assert list(np.asarray(tokens)) == [0, 1, 2]
    expected = np.asarray(jax.nn.log_softmax(logits[0]))
    np.testing.assert_allclose(np.asarray(logprobs), expected[[0, 1, 2]], rtol=1e-6)
    drawn = sample(logits[:1], batch([SamplingParams.from_dict({"temperature": 1.0, "seed": 3,
                                                                "logit_bias": {"3": 100}})]))[0]
    assert int(drawn[0]) == 3
    assert batch(params).bias_ids.shape == (3, 2) and batch([SamplingParams()]).bias_ids.shape == (1, 0)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": 0},
                                 {"min_p": 2}, {"presence_penalty": 3}, {"max_new_tokens": -1}, {"nope": 1},
                                 {"logit_bias": {"5": 101}}, {"logit_bias": {"x": 1}}])
def test_invalid_sampling_parameters_name_the_field(bad):
    with pytest.raises(SamplingParamsError, match=next(iter(bad))):
        SamplingParams.from_dict(bad)


def test_seeded_sampling_is_independent_of_the_batch(tiny_hf_dir):
    engine = Engine(model_path=str(tiny_hf_dir), dtype="float32", context_length=64, page_size=4)
    seeded = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    alone = engine.generate(input_ids=[1, 2, 3], sampling_params=seeded)["output_ids"]
    crowd = engine.generate(input_ids=[[9, 9], [1, 2, 3], [4]],
                            sampling_params=[{"max_new_tokens": 5, "temperature": 0.7}, seeded, {"max_new_tokens": 3}])
    assert crowd[1]["output_ids"] == alone


def test_bfloat16_model_tracks_float32_within_bf16_rounding(tiny_hf_dir):
    ids = np.random.RandomState(3).randint(0, 512, (2, 11))
    exact = prefill_logits(load_model(tiny_hf_dir, dtype=jnp.float32), ids)
    bf16 = prefill_logits(load_model(tiny_hf_dir, dtype=jnp.bfloat16), ids)
    assert bf16.dtype == np.float32
    assert np.linalg.norm(bf16 - exact) <= 0.05 * np.linalg.norm(exact)    # bf16: 8 bits of mantissa


def test_default_bfloat16_engine_generates_text():
    engine = Engine(context_length=64)
    out = engine.generate(prompt="Hello", sampling_params={"max_new_tokens": 6, "temperature": 0.0},
                          return_logprob=True)
    assert len(out["output_ids"]) == 6 and isinstance(out["text"], str)
    assert all(np.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])


@pytest.mark.parametrize("params, candidates", [
    (dict(temperature=1.0), 256),                          # Gumbel-max over the whole vocabulary
    (dict(temperature=1.0, top_k=3), 256),                 # filtered among the candidates
    (dict(temperature=1.0, top_k=3), 2),                   # top-k beyond the candidates: full sort
    (dict(temperature=1.0, top_p=0.8), 256),
])
def test_draws_follow_the_filtered_distribution(params, candidates):
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
    probs = np.exp(logits)
    if params.get("top_k"):
        probs[params["top_k"]:] = 0
    if params.get("top_p"):
        probs[np.cumsum(probs) - probs >= params["top_p"]] = 0
    probs /= probs.sum()
    n = 4000
    p = SamplingParams(**params)
    sb = SamplingBatch.build([p] * n, list(range(n)), [0] * n, n)
    tokens = np.asarray(sample(jnp.tile(jnp.asarray(logits), (n, 1)), sb, candidates=candidates)[0])
    freq = np.bincount(tokens, minlength=5) / n
    np.testing.assert_allclose(freq, probs, atol=0.03)


def _has_device_branch(logits, sb) -> bool:
    return "cond[" in str(jax.make_jaxpr(lambda x, b: sample(x, b))(logits, sb))


def test_branches_the_host_can_decide_are_not_left_to_the_device():
    # On GPUs a device-side conditional blocks the launching thread until the device reaches it,
    # so host and device would not overlap; the host knows these cases from the parameters.
    logits = jnp.zeros((3, 300), jnp.float32)
    greedy = batch([SamplingParams(temperature=0.0)] * 2 + [None])
    top_k_bounded = batch([SamplingParams(temperature=1.0, top_k=40, top_p=0.95), SamplingParams(temperature=0.0)])
    top_p_only = batch([SamplingParams(temperature=1.0, top_p=0.95)])
    assert greedy.all_greedy and not _has_device_branch(logits, greedy)
    assert not _has_device_branch(logits[:2], top_k_bounded)
    assert _has_device_branch(logits[:1], top_p_only)        # may need the whole vocabulary sorted
    assert _has_device_branch(logits[:1], batch([SamplingParams(temperature=1.0, top_k=280)]))  # beyond 256
    assert not _has_device_branch(logits[:1], batch([SamplingParams(temperature=1.0)]))         # Gumbel-max


def test_greedy_slots_take_the_argmax_beside_sampled_ones():
    rng = np.random.RandomState(1)
    logits = jnp.asarray(rng.standard_normal((4, 50)) * 2, jnp.float32)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=3)] * 2
    sb = batch(params)
    assert not sb.all_greedy
    tokens = np.asarray(sample(logits, sb)[0])
    best = np.asarray(jnp.argmax(logits, -1))
    assert tokens[0] == best[0] and tokens[2] == best[2]



def test_top_k_over_vocabulary_parts_equals_top_k_of_the_whole_ties_included():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sharding.forward import vocab_top_k
    from tests.parallel_utils import needs_devices
    needs_devices(8)
    rng = np.random.RandomState(0)
    x = rng.randint(0, 40, (4, 64)).astype(np.float32)          # many equal values
    carried = rng.standard_normal((4, 64)).astype(np.float32)
    # (dp, tp, k): k = 16 exceeds a part of 64 / 8 tokens, which takes top_k_carrying whole
    for dp, tp, k in ((1, 1, 8), (2, 4, 8), (1, 8, 8), (1, 8, 16)):
        expected = top_k_carrying(jnp.asarray(x), k, jnp.asarray(carried))
        mesh = Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("dp", "tp"))
        split = NamedSharding(mesh, P("dp", "tp"))
        got = jax.jit(lambda a, c: vocab_top_k(mesh, top_k_carrying)(a, k, c))(jax.device_put(x, split),
                                                                            jax.device_put(carried, split))
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
