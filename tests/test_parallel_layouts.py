"""The seed's schedule on 8 simulated devices: every layout equals the single-device model."""
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.engine.engine import Engine
from minimax_jax.hf_testing import make_hf_model, save_hf_checkpoint
from minimax_jax.loader import load_model
from sharding.forward import VOCAB_SPLIT_MIN_SLOTS
from sharding.mesh import Layout
from tests.parallel_utils import LayoutRunner, make_step, reference_logits

SLOTS, T, PAGE = 8, 12, 4
NVFP4_RELATIVE_ERROR = 0.1      # relative Frobenius error of NVFP4 on Gaussian data (docs/quantization.md)
PAGES_PER_SLOT = T // PAGE


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir, dtype=jnp.float32)   # 8 heads, 2 KV heads, 8 experts


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 512, (SLOTS, T))
    valid = np.ones((SLOTS, T), bool)
    return tokens, valid


def page_table(layout: Layout) -> np.ndarray:
    per_rank = SLOTS // layout.dp
    slot_in_rank = np.arange(SLOTS) % per_rank
    return (slot_in_rank[:, None] * PAGES_PER_SLOT + np.arange(PAGES_PER_SLOT)).astype(np.int32)


def run_layout(model, layout, tokens, valid, kv_fill=None):
    runner = LayoutRunner(model, layout, SLOTS // layout.dp * PAGES_PER_SLOT, PAGE, kv_fill)
    last = np.maximum(valid.sum(1) - 1, 0)
    logits, counts = runner(make_step(tokens, valid, page_table(layout)), last)
    return logits, counts, runner


LAYOUTS = [
    Layout(1, 8), Layout(8, 1), Layout(2, 4), Layout(4, 2),
    Layout(1, 8, moe="tp"), Layout(8, 1, moe="tp"), Layout(4, 2, moe="tp"),
    Layout(1, 8, ar_fusion=False), Layout(4, 2, ar_fusion=False, combine="all_reduce"),
    Layout(8, 1, combine="all_reduce"),
] + [Layout(2, 4, moe=moe, combine=c, ar_fusion=f)
     for moe in ("ep", "tp") for c in ("reduce_scatter", "all_reduce") for f in (True, False)
     if (moe, c, f) != ("ep", "reduce_scatter", True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layout_prefill_logits_equal_single_device(model, batch, layout):
    tokens, valid = batch
    ref = reference_logits(model, tokens, valid, PAGE)
    logits, _, _ = run_layout(model, layout, tokens, valid)
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fp4_dispatch_equals_single_device_fp4_reference_and_bounds_the_error(model, batch):
    tokens, valid = batch
    exact = reference_logits(model, tokens, valid, PAGE)
    ref_fp4 = reference_logits(model, tokens, valid, PAGE, fp4_dispatch=True)
    for layout in (Layout(8, 1, fp4_dispatch=True), Layout(2, 4, fp4_dispatch=True),
                   Layout(2, 4, fp4_dispatch=True, ar_fusion=False)):
        logits, _, _ = run_layout(model, layout, tokens, valid)
        # the mesh path adds nothing beyond NVFP4 rounding of each token's MoE input...
        assert np.abs(logits - ref_fp4).max() <= 1e-5 * np.abs(ref_fp4).max(), layout
    # ...which costs each layer's MoE input at most 0.1 relative error (the NVFP4 bound asserted
    # in test_quant_nvfp4); to first order the logits carry one such error per layer. Measured
    # here: 0.20 relative for 2 layers of this deliberately harsh random model.
    bound = NVFP4_RELATIVE_ERROR * (model.cfg.num_layers + 1)
    assert np.linalg.norm(ref_fp4 - exact) <= bound * np.linalg.norm(exact)


def test_tp_beyond_kv_heads_replicates_heads_and_their_k_norm(model, batch):
    assert model.cfg.num_kv_heads == 2
    tokens, valid = batch
    ref = reference_logits(model, tokens, valid, PAGE)
    logits, _, runner = run_layout(model, Layout(1, 8), tokens, valid)
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
    assert runner.kv[0].shape[3] == 8          # each of the 8 devices holds a copy of one KV head


def test_uneven_and_idle_dp_ranks(model):
    """dp4 x tp2: rank 0 full, rank 1 partial, rank 2 idle, rank 3 a single token."""
    layout = Layout(4, 2)
    rng = np.random.RandomState(5)
    tokens = rng.randint(0, 512, (SLOTS, T))
    valid = np.zeros((SLOTS, T), bool)
    lengths = [T, T, 7, 3, 0, 0, 1, 0]               # two slots per rank
    for slot, n in enumerate(lengths):
        valid[slot, :n] = True
    kv_fill = rng.standard_normal((model.cfg.num_layers, layout.dp * 2 * PAGES_PER_SLOT, PAGE,
                                   model.cfg.num_kv_heads, model.cfg.head_dim)).astype(np.float32)
    logits, counts, runner = run_layout(model, layout, tokens, valid, kv_fill)
    live = valid.any(1)
    ref = reference_logits(model, tokens, valid, PAGE)
    assert np.abs(logits[live] - ref[live]).max() <= 1e-5 * np.abs(ref[live]).max()

    # the idle rank wrote no KV entry; the others wrote exactly their valid tokens' slots
    per_rank = 2 * PAGES_PER_SLOT
    k_after = np.asarray(runner.kv[0])
    idle = slice(2 * per_rank, 3 * per_rank)
    np.testing.assert_array_equal(k_after[:, idle], kv_fill[:, idle])
    written = np.any(k_after != kv_fill, axis=(0, 3, 4)).reshape(-1)
    assert written.sum() == valid.sum()

    # padding tokens are routed to no expert
    k, experts = model.cfg.num_experts_per_tok, model.cfg.num_experts
    totals = counts.sum(axis=0)                       # [layers, experts + 1]
    assert (totals[:, :experts].sum(axis=1) == k * valid.sum()).all()
    assert (totals[:, experts] == k * (~valid).sum()).all()

    # nothing of the padding reaches valid tokens: change every padding token, same logits
    tokens2 = np.where(valid, tokens, rng.randint(0, 512, tokens.shape))
    logits2, _, _ = run_layout(model, layout, tokens2, valid, kv_fill)
    np.testing.assert_array_equal(logits2[live], logits[live])


def _collectives_in_layer_loop(hlo: str) -> list[tuple[str, str, int]]:
    """(op, result type, replica-group size) of each collective in the layer scan's body."""
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    found = []
    for body in bodies:
        block = re.search(rf"^%?{re.escape(body)} .*?^}}", hlo, re.S | re.M).group(0)
        ops = re.findall(r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
                         r".*?replica_groups=\{(\{[\d,]*\})", block)
        if ops:
            found.append([(op, ty, group.count(",") + 1) for ty, op, group in ops])
    assert len(found) == 1, f"expected one loop with collectives (the layer scan), found {len(found)}"
    return sorted(found[0])


def _decode_hlo(model, layout):
    tokens = np.arange(SLOTS)[:, None] % 512
    valid = np.ones((SLOTS, 1), bool)
    runner = LayoutRunner(model, layout, SLOTS // layout.dp * PAGES_PER_SLOT, PAGE)
    return runner.lowered_text(make_step(tokens, valid, page_table(layout), start=5), np.zeros(SLOTS))


def test_dep_decode_hlo_has_one_fp4_all_gather_and_one_reduce_scatter_per_layer(model):
    ops = _collectives_in_layer_loop(_decode_hlo(model, Layout(8, 1, fp4_dispatch=True)))
    h, k = model.cfg.hidden_size, model.cfg.num_experts_per_tok
    width = h // 2 + h // 16 + 4 + 8 * k                # codes, scales, global scale, ids, weights
    assert ops == [("all-gather", f"u8[8,{width}]{{1,0}}", 8), ("reduce-scatter", f"f32[1,{h}]{{1,0}}", 8)]


def test_tp4_hlo_with_and_without_ar_fusion(model):
    h = model.cfg.hidden_size
    fused = _collectives_in_layer_loop(_decode_hlo(model, Layout(2, 4)))
    assert [(op, n) for op, _, n in fused] == [
        ("all-gather", 4), ("all-gather", 8), ("all-reduce", 4), ("reduce-scatter", 4), ("reduce-scatter", 8)]
    assert [ty for op, ty, _ in fused if op == "all-reduce"] == ["f32[4,2]{1,0}"]   # joint QK norm only
    unfused = _collectives_in_layer_loop(_decode_hlo(model, Layout(2, 4, ar_fusion=False, combine="all_reduce")))
    assert [(op, n) for op, _, n in unfused] == [("all-gather", 2), ("all-reduce", 4), ("all-reduce", 4), ("all-reduce", 8)]
    assert sorted(ty for op, ty, _ in unfused if op == "all-reduce") == sorted(
        ["f32[4,2]{1,0}", f"f32[4,{h}]{{1,0}}", f"f32[8,{h}]{{1,0}}"])


def test_a_step_whose_tokens_do_not_divide_over_tp_keeps_the_residual_replicated(model):
    """One decode token on tp=2: no padding to 2 rows, no reduce-scatter; equals one device."""
    layout = Layout(1, 2)
    rng = np.random.RandomState(11)
    tokens, valid = rng.randint(0, 512, (1, 1)), np.ones((1, 1), bool)
    kv_fill = rng.standard_normal((model.cfg.num_layers, PAGES_PER_SLOT, PAGE, model.cfg.num_kv_heads,
                                   model.cfg.head_dim)).astype(np.float32)
    runner = LayoutRunner(model, layout, PAGES_PER_SLOT, PAGE, kv_fill)
    table = np.arange(PAGES_PER_SLOT, dtype=np.int32)[None]
    step = make_step(tokens, valid, table, start=5)
    logits, _ = runner(step, np.zeros(1))
    reference = LayoutRunner(model, Layout(1, 1), PAGES_PER_SLOT, PAGE, kv_fill)
    expected, _ = reference(step, np.zeros(1))
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    ops = _collectives_in_layer_loop(runner.lowered_text(step, np.zeros(1)))
    assert {op for op, _, _ in ops} == {"all-reduce"}


ENGINE_LAYOUTS = {
    "tp8": dict(tp_size=8, max_running_requests=10),
    "tp8-no-ar-fusion": dict(tp_size=8, enable_ar_fusion=False, max_running_requests=10),
    "dep8": dict(tp_size=8, dp_size=8, enable_dp_attention=True),
    "dp2-tp4-moe-tp": dict(tp_size=8, dp_size=2, enable_dp_attention=True, ep_size=1),
    "dp4-tp2-all-reduce": dict(tp_size=8, dp_size=4, enable_dp_attention=True, moe_combine="all_reduce"),
}


@pytest.fixture(scope="module")
def greedy_reference(tiny_hf_dir):
    rng = np.random.RandomState(7)
    prompts = [rng.randint(0, 512, n).tolist() for n in (5, 23, 11)]
    engine = Engine(model_path=str(tiny_hf_dir), dtype="float32", context_length=64, page_size=4)
    params = {"max_new_tokens": 32, "temperature": 0.0}
    return prompts, [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]


@pytest.mark.parametrize("flags", list(ENGINE_LAYOUTS.values()), ids=list(ENGINE_LAYOUTS))
def test_engine_greedy_tokens_identical_on_every_layout(tiny_hf_dir, greedy_reference, flags):
    prompts, expected = greedy_reference
    engine = Engine(model_path=str(tiny_hf_dir), dtype="float32", context_length=64, page_size=4, **flags)
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 32, "temperature": 0.0})
    assert [o["output_ids"] for o in outs] == expected
    assert engine.kv_pages_used == 0
    if "max_running_requests" in flags:     # 10 slots on tp8: with AR fusion the full batch pads to 16,
        assert engine.batch_buckets[-1] == (16 if engine.layout.ar_fusion else 10)     # which divides over tp


def test_sampling_on_vocabulary_shards_draws_the_tokens_and_logprobs_of_one_device(tmp_path):
    """TP hands the sampler of a full batch the logits split over the vocabulary: a seeded draw
    with filters, penalties and top logprobs gives one device's tokens, and no device gathers a
    [slots, vocab] array, only each part's top candidates (2048 tokens: each quarter holds the
    256 the filters take)."""
    path = save_hf_checkpoint(make_hf_model(seed=2, vocab_size=2048), tmp_path)
    rng = np.random.RandomState(8)
    prompts = rng.randint(0, 2048, (VOCAB_SPLIT_MIN_SLOTS, 7)).tolist()     # one prefill shape
    params = [{"max_new_tokens": 5, "temperature": 0.9, "top_p": 0.8, "top_k": 50, "seed": 3, "top_logprobs_num": 3},
              {"max_new_tokens": 5, "temperature": 1.3, "seed": 4, "frequency_penalty": 0.5},
              {"max_new_tokens": 5, "temperature": 0.7, "top_k": 200, "min_p": 0.01, "seed": 5}] * 6
    params = params[:len(prompts)]
    runs = []
    for flags in ({}, dict(tp_size=4)):
        engine = Engine(model_path=str(path), dtype="float32", context_length=64, page_size=4, **flags)
        runs.append(engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True))
    one, tp4 = runs
    assert [o["output_ids"] for o in tp4] == [o["output_ids"] for o in one]
    for a, b in zip(one, tp4):
        np.testing.assert_allclose([lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]],
                                   [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]], atol=1e-4)
    assert [[t for _, t, _ in step] for step in tp4[0]["meta_info"]["output_top_logprobs"]] == \
        [[t for _, t, _ in step] for step in one[0]["meta_info"]["output_top_logprobs"]]
    decode = [e for (shape, _), e in engine.runner._compiled.items() if shape[0] >= VOCAB_SPLIT_MIN_SLOTS]
    for executable in decode:           # the steps of all 16 slots; those of fewer gather
        gathered = re.findall(r"= \w+\[\d+,(\d+)\]\S* all-gather", executable.as_text())
        assert gathered and max(map(int, gathered)) <= 4 * 256, gathered
    assert decode


@pytest.mark.parametrize("dtypes", [("bfloat16", "int32", "float32"),                   # bf16 dispatch
                                    ("uint8", "float8_e4m3fn", "int32", "float32"),     # NVFP4 dispatch
                                    ("float32", "bfloat16")])
def test_dispatch_packs_rows_in_words_of_the_first_arrays_width_and_unpacks_them_bit_for_bit(dtypes):
    """The hidden states travel word for word (their columns come back as a slice and a bitcast
    of the same width) and the routing rides along in such words, NaN-patterned bits included:
    the words are unsigned integers, which no float pass of XLA rewrites."""
    import jax
    from sharding.collectives import pack_rows, unpack_rows
    rng = np.random.RandomState(1)
    widths = {"bfloat16": 64, "uint8": 32, "float8_e4m3fn": 4, "int32": 8, "float32": 8}
    arrays = [jnp.asarray(rng.randint(0, 256, (5, widths.get(d, 4) * jnp.dtype(d).itemsize), np.uint8)
                          .view(jnp.dtype(d))) for d in dtypes]
    like = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    packed = jax.jit(pack_rows)(arrays)
    assert packed.dtype == jnp.dtype(f"uint{8 * arrays[0].dtype.itemsize}")
    for unpack in (jax.jit(lambda p: unpack_rows(p, like)), lambda p: unpack_rows(p, like)):
        for a, b in zip(arrays, unpack(packed)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert (np.asarray(a).view(np.uint8) == np.asarray(b).view(np.uint8)).all()


@pytest.fixture(scope="module")
def w8a8_model(tmp_path_factory):
    """FP8 experts in whole 128-wide blocks, run by the W8A8 kernels' XLA reference."""
    src = save_hf_checkpoint(make_hf_model(seed=5, hidden_size=128, intermediate_size=128),
                             tmp_path_factory.mktemp("w8a8"))
    model = load_model(src, dtype=jnp.float32, quantization="fp8")
    model.layers.experts.kernel = "xla-w8a8"
    return model


@pytest.mark.parametrize("layout", [Layout(8, 1), Layout(2, 4), Layout(4, 2, ar_fusion=False)], ids=str)
def test_w8a8_tokens_gathered_as_fp8_codes_give_the_logits_of_tokens_gathered_whole(w8a8_model, batch, layout):
    """The experts round each token on its own, so rounding before the all-gather changes no
    number; both equal one device running the same kernel."""
    tokens, valid = batch
    ref = reference_logits(w8a8_model, tokens, valid, PAGE)
    codes, _, _ = run_layout(w8a8_model, layout, tokens, valid)
    whole, _, _ = run_layout(w8a8_model, dataclasses.replace(layout, fp8_dispatch=False), tokens, valid)
    np.testing.assert_allclose(codes, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
    assert np.abs(codes - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("layout", [Layout(8, 1, fp4_dispatch=True), Layout(2, 4, fp4_dispatch=True)], ids=str)
def test_w8a8_tokens_gathered_as_nvfp4_give_the_single_device_fp4_logits(w8a8_model, batch, layout):
    """W8A8 experts take an NVFP4 dispatch's tokens as FP8 codes made from the gathered codes in
    one pass; one device rounds its tokens through NVFP4 the same way."""
    tokens, valid = batch
    ref = reference_logits(w8a8_model, tokens, valid, PAGE, fp4_dispatch=True)
    logits, _, _ = run_layout(w8a8_model, layout, tokens, valid)
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(ref - reference_logits(w8a8_model, tokens, valid, PAGE)).max() > 1e-3 * np.abs(ref).max()


def test_w8a8_dispatch_gathers_fp8_codes_and_scales_in_about_half_the_bytes(w8a8_model):
    h, k = w8a8_model.cfg.hidden_size, w8a8_model.cfg.num_experts_per_tok
    ops = _collectives_in_layer_loop(_decode_hlo(w8a8_model, Layout(8, 1)))
    width = h + 4 * (h // 128) + 8 * k                  # codes, fp32 scales, ids, weights
    assert ops == [("all-gather", f"u8[8,{width}]{{1,0}}", 8), ("reduce-scatter", f"f32[1,{h}]{{1,0}}", 8)]
    whole = _collectives_in_layer_loop(_decode_hlo(w8a8_model, Layout(8, 1, fp8_dispatch=False)))
    assert whole[0] == ("all-gather", f"u32[8,{h + 2 * k}]{{1,0}}", 8)     # fp32 model: words of 4 bytes
