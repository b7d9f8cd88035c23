"""Engine behaviour: overlapped steps, stopping, aborts, compile count, KV cache options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.engine.engine import Engine
from minimax_jax.engine.runner import kv_pages_that_fit, pages_the_decode_kernel_reads
from minimax_jax.ops import decode_attention, moe as moe_ops


def make_engine(path, **kw):
    return Engine(model_path=str(path), dtype="float32", context_length=64, page_size=4, **kw)


def test_a_stop_token_ends_the_output_although_the_next_step_was_already_launched(tiny_hf_dir):
    engine = make_engine(tiny_hf_dir)
    greedy = engine.generate(input_ids=[3, 1, 4, 1, 5], sampling_params={"max_new_tokens": 10, "temperature": 0})
    stop = greedy["output_ids"][2]
    first = greedy["output_ids"].index(stop)
    out = engine.generate(input_ids=[3, 1, 4, 1, 5],
                          sampling_params={"max_new_tokens": 10, "temperature": 0, "stop_token_ids": [stop]})
    assert out["output_ids"] == greedy["output_ids"][:first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert engine.kv_pages_used == 0 and not engine.has_work()


def test_compile_count_stays_flat_after_warm_up(tiny_hf_dir):
    engine = make_engine(tiny_hf_dir, max_running_requests=8)
    rng = np.random.RandomState(0)
    workload = lambda: engine.generate(
        input_ids=[rng.randint(0, 512, n).tolist() for n in (5, 17, 30, 9)],
        sampling_params=[{"max_new_tokens": n, "temperature": 0.7, "seed": n} for n in (4, 9, 2, 12)])
    workload()
    compiled = engine.num_compiles
    for _ in range(3):
        workload()
    assert engine.num_compiles == compiled


def test_compile_decode_leaves_nothing_to_compile_for_decoding_at_that_concurrency(tiny_hf_dir):
    """Contexts of 31-40 tokens in pages of 4 cross from 8 pages (page table width 8) to 9-10
    (width 16): two executables, and decoding those requests compiles nothing more."""
    engine = make_engine(tiny_hf_dir, max_running_requests=8)
    prompts = [list(range(1 + i, 31 + i)) for i in range(4)]
    greedy = {"max_new_tokens": 10, "temperature": 0}
    engine.generate(input_ids=prompts, sampling_params=dict(greedy, max_new_tokens=1))   # prefill only
    engine.flush_cache()        # or the same prompts start on cached pages: a prefill of another shape
    assert engine.compile_decode(4, range(31, 41), greedy) == 2
    compiled = engine.num_compiles
    engine.generate(input_ids=prompts, sampling_params=greedy)
    assert engine.num_compiles == compiled
    with pytest.raises(ValueError, match="num_requests"):
        engine.compile_decode(9, [40])
    with pytest.raises(ValueError, match="context lengths"):
        engine.compile_decode(4, [65])
    with pytest.raises(ValueError, match="unpenalised"):
        engine.compile_decode(4, [40], dict(greedy, presence_penalty=1.0))


def test_decode_steps_of_few_slots_compile_as_command_buffers_and_give_the_same_tokens(tiny_hf_dir):
    """cuda_graph_max_bs=1: one request's decode steps compile with command buffers for every
    thunk (XLA's GPU options; the CPU ignores them), its prefill and a two-request decode do
    not, and the tokens are those of an engine without them."""
    engine = make_engine(tiny_hf_dir, max_running_requests=2, cuda_graph_max_bs=1)
    compiled_as = []
    for name in ("_step", "_graph_step"):
        jitted = getattr(engine.runner, name)

        class Spy:
            def lower(self, *args, _jitted=jitted, _name=name):
                compiled_as.append((_name, args[2].shape[0], args[4].leaves[0][0][1]))   # slots, tokens per slot
                return _jitted.lower(*args)
        setattr(engine.runner, name, Spy())
    greedy = {"max_new_tokens": 4, "temperature": 0}
    one = engine.generate(input_ids=[3, 1, 4, 1, 5], sampling_params=greedy)
    assert ("_graph_step", 1, 1) in compiled_as and all(t > 1 for name, _, t in compiled_as if name == "_step")
    engine.generate(input_ids=[[3, 1, 4], [2, 7, 1, 8]], sampling_params=greedy)
    assert ("_step", 2, 1) in compiled_as
    assert one["output_ids"] == make_engine(tiny_hf_dir).generate(input_ids=[3, 1, 4, 1, 5],
                                                                  sampling_params=greedy)["output_ids"]
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        make_engine(tiny_hf_dir, cuda_graph_max_bs=-1)


def test_abort_frees_pages_at_once_and_others_continue(tiny_hf_dir):
    engine = make_engine(tiny_hf_dir)
    keep = engine.submit(engine.make_request(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 8, "temperature": 0}))
    drop = engine.submit(engine.make_request(input_ids=[4, 5, 6], sampling_params={"max_new_tokens": 30, "temperature": 0}))
    for _ in range(3):
        engine.step()
    used = engine.kv_pages_used
    assert engine.abort(drop.rid)
    assert engine.kv_pages_used < used and drop.finish_reason == {"type": "abort"}
    engine.run_until_done()
    assert len(keep.output_ids) == 8 and engine.kv_pages_used == 0
    alone = make_engine(tiny_hf_dir).generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 8, "temperature": 0})
    assert keep.output_ids == alone["output_ids"]


def test_penalised_requests_see_every_previous_token(tiny_hf_dir):
    engine = make_engine(tiny_hf_dir)
    params = {"max_new_tokens": 16, "temperature": 0, "presence_penalty": 2.0}
    out = engine.generate(input_ids=[7, 7, 7], sampling_params=params)["output_ids"]
    # greedy with a presence penalty of 2 on a logit scale of ~1: no token repeats
    assert len(set(out)) == len(out)


def test_page_table_is_as_wide_as_the_longest_sequence_not_the_context(tiny_hf_dir):
    engine = Engine(model_path=str(tiny_hf_dir), dtype="float32", context_length=4096, page_size=4)
    widths = []
    engine.on_step.append(lambda scheduled, seconds: widths.append(scheduled.step.page_table.shape[1]))
    out = engine.generate(input_ids=list(range(1, 30)), sampling_params={"max_new_tokens": 10, "temperature": 0})
    assert engine.pages_per_seq == 1024
    assert max(widths) == 16                     # 39 tokens need 10 pages of 4: bucket 16
    short = make_engine(tiny_hf_dir).generate(input_ids=list(range(1, 30)),
                                              sampling_params={"max_new_tokens": 10, "temperature": 0})
    assert out["output_ids"] == short["output_ids"]


def test_only_steps_whose_chunks_all_start_their_sequences_are_fresh(tiny_hf_dir):
    """A prompt longer than a chunk: its first chunk is fresh (attention may read the chunk's own
    keys), its continuation and the decode steps are not; cuDNN's path (jax.nn's XLA form here)
    gives the reference's tokens either way."""
    steps = []
    outs = {}
    for backend in ("xla", "cudnn"):
        engine = make_engine(tiny_hf_dir, chunked_prefill_size=16, attention_backend=backend)
        engine.on_step.append(lambda scheduled, seconds: steps.append(
            (scheduled.step.tokens.shape[1], int(scheduled.step.positions[0, 0]), scheduled.step.fresh)))
        outs[backend] = engine.generate(input_ids=list(range(1, 30)),
                                        sampling_params={"max_new_tokens": 4, "temperature": 0})["output_ids"]
    assert steps[:3] == [(16, 0, True), (16, 16, False), (1, 29, False)]
    assert outs["cudnn"] == outs["xla"]


def test_fp8_kv_cache_stores_half_the_bytes_and_follows_the_full_precision_cache(tiny_hf_dir):
    prompt = np.random.RandomState(2).randint(0, 500, 20).tolist()
    params = {"max_new_tokens": 8, "temperature": 0.0}
    outs = {}
    for kv in ("auto", "fp8_e4m3"):
        engine = make_engine(tiny_hf_dir, kv_cache_dtype=kv)
        outs[kv] = engine.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
        cache = engine.runner.kv[0]
        assert cache.dtype == (jnp.float8_e4m3fn if kv == "fp8_e4m3" else jnp.float32)
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4 per element): close, not equal
    assert outs["fp8_e4m3"]["output_ids"] == outs["auto"]["output_ids"]
    full = [lp for lp, _, _ in outs["auto"]["meta_info"]["output_token_logprobs"]]
    fp8 = [lp for lp, _, _ in outs["fp8_e4m3"]["meta_info"]["output_token_logprobs"]]
    assert 0 < np.abs(np.subtract(full, fp8)).max() < 0.2


def test_bad_cache_and_kernel_options_are_refused_by_name_at_construction(tiny_hf_dir, monkeypatch):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(model_path=str(tiny_hf_dir), kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="mem_fraction_static"):
        Engine(model_path=str(tiny_hf_dir), mem_fraction_static=1.5)
    with pytest.raises(ValueError, match="moe_kernel must be one of"):
        Engine(model_path=str(tiny_hf_dir), moe_kernel="triton")
    monkeypatch.setattr(moe_ops, "on_hopper", lambda: False)      # as here, whatever runs the test
    with pytest.raises(ValueError, match="need an NVIDIA Hopper GPU"):
        Engine(model_path=str(tiny_hf_dir), moe_kernel="mosaic-ws-w8a8")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        Engine(model_path=str(tiny_hf_dir), attention_backend="flashinfer")


def test_kv_pages_fill_the_memory_left_by_the_weights_on_the_fullest_device():
    gib = 2**30
    stats = [{"bytes_limit": 80 * gib, "bytes_in_use": 60 * gib}, {"bytes_limit": 80 * gib, "bytes_in_use": 62 * gib}]
    # 0.9 * 80 - 62 = 10 GiB on the fuller device, pages of 1 MiB
    assert kv_pages_that_fit(stats, 0.9, 2**20, None) == 10 * 1024
    assert kv_pages_that_fit(stats, 0.9, 2**20, 100) == 100
    with pytest.raises(ValueError, match="no memory left"):
        kv_pages_that_fit(stats, 0.7, 2**20, None)
    with pytest.raises(ValueError, match="--max-total-tokens"):
        kv_pages_that_fit([None, None], 0.9, 2**20, None)


def test_an_fp8_kv_cache_the_decode_kernel_would_read_at_wrapped_offsets_grows_just_past_4_gib():
    # one device's k cache at 16 layers of 8 KV heads, pages of 64: 2**20 entries a page
    fp8 = lambda pages: jax.ShapeDtypeStruct((16, pages, 64, 8, 128), jnp.float8_e4m3fn)  # noqa: E731
    assert not decode_attention.supports(fp8(4096))         # 256 requests of 1016 tokens: exactly 4 GiB
    assert pages_the_decode_kernel_reads(4096, 10_000, fp8) == 4097
    assert pages_the_decode_kernel_reads(2049, 10_000, fp8) == 4097
    assert decode_attention.supports(fp8(4097))
    assert pages_the_decode_kernel_reads(2048, 10_000, fp8) == 2048      # 2**31 entries: read as it is
    assert pages_the_decode_kernel_reads(5000, 10_000, fp8) == 5000
    assert pages_the_decode_kernel_reads(3000, 4096, fp8) == 3000        # no room: kept (the engine warns)
    bf16 = lambda pages: jax.ShapeDtypeStruct((16, pages, 64, 8, 128), jnp.bfloat16)  # noqa: E731
    assert pages_the_decode_kernel_reads(3000, 10_000, bf16) == 3000


def first_prefill_chunks(budget: int, prompt_len: int, buckets: bool = True) -> list[int]:
    """Chunk lengths of the first prefill plan of six equal prompts, rows of at most 1024."""
    from minimax_jax.engine.sampling import SamplingParams
    from minimax_jax.engine.scheduler import PageAllocator, Request, Scheduler
    shapes = ([4, 8, 16], [256, 512, 1024]) if buckets else ()
    sched = Scheduler(PageAllocator(10_000), 16, 64, 1024, budget, *shapes)
    for i in range(6):
        sched.add(Request(rid=str(i), prompt_ids=list(range(prompt_len)), params=SamplingParams(max_new_tokens=4)))
    return [len(c) for c in sched.plan().chunks]


def test_prefill_budget_counts_the_padded_rows_a_step_computes():
    """Five 900-token prompts in rows of 1024 would compute as 8 rows (8192 tokens) against a
    budget of 4096: the fifth waits for the next step."""
    assert first_prefill_chunks(4096, 900) == [900] * 4
    assert first_prefill_chunks(4096, 900, buckets=False) == [900] * 4 + [496]
    # one row already pads to 4 x 1024 > budget: the three rows of padding still fill up
    assert first_prefill_chunks(1024, 300) == [300, 300, 300, 124]


def test_prefill_sizes_default_by_platform_and_given_sizes_stay():
    from minimax_jax.engine.engine import EngineArgs, prefill_defaults
    gpu = prefill_defaults(EngineArgs(), "gpu")
    assert (gpu.chunked_prefill_size, gpu.max_prefill_tokens) == (8192, 8192)
    cpu = prefill_defaults(EngineArgs(), "cpu")
    assert (cpu.chunked_prefill_size, cpu.max_prefill_tokens) == (256, 1024)
    given = prefill_defaults(EngineArgs(chunked_prefill_size=512, max_prefill_tokens=2048), "gpu")
    assert (given.chunked_prefill_size, given.max_prefill_tokens) == (512, 2048)


def test_prompt_logprobs_on_dp_and_tp_ranks_equal_one_device_and_skip_decode_steps(tiny_hf_dir):
    """The lm_head's vocabulary split over tp (each position's log-softmax gathered whole) and
    prompts on two dp ranks, one batch with a request that scores nothing: the same prompt
    logprobs as one device. Steps without a scored position compile no scoring variant."""
    from tests.parallel_utils import needs_devices
    needs_devices(4)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8]]
    params = {"max_new_tokens": 3, "temperature": 0.0, "top_logprobs_num": 2}

    def scored(**flags):
        engine = make_engine(tiny_hf_dir, **flags)
        steps = []
        engine.on_step.append(lambda scheduled, _: steps.append((scheduled.step.tokens.shape[1], scheduled.targets)))
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=2)
        assert all(targets is None for t, targets in steps if t == 1)     # decode steps score nothing
        assert any(targets is not None for t, targets in steps if t > 1)
        plain = engine.generate(input_ids=prompts[1], sampling_params=params, return_logprob=True)
        assert "input_token_logprobs" not in plain["meta_info"]
        return [(o["meta_info"]["input_token_logprobs"], o["meta_info"]["input_top_logprobs"]) for o in outs]

    one = scored()
    assert [len(lps) for lps, _ in one] == [8, 4]
    for flags in (dict(tp_size=2), dict(tp_size=2, dp_size=2, enable_dp_attention=True)):
        for (lps, tops), (ref_lps, ref_tops) in zip(scored(**flags), one):
            np.testing.assert_allclose([lp for lp, _, _ in lps], [lp for lp, _, _ in ref_lps], atol=1e-5)
            assert [[t for _, t, _ in top] for top in tops] == [[t for _, t, _ in top] for top in ref_tops]


def test_assembled_slots_hold_each_requests_chunk_pages_and_sampling_whatever_the_step():
    """A decode step (filled column by column) and a prefill step (row by row) of two ranks and an
    idle one: each request's slot holds its tokens, positions, first `width` pages, input source
    and sampling position; padding slots hold nothing."""
    from minimax_jax.engine.sampling import SamplingParams
    from minimax_jax.engine.scheduler import RankPlan, Request, assemble
    rng = np.random.RandomState(3)
    params = SamplingParams.from_dict({"max_new_tokens": 4, "temperature": 0.0})

    def request(prompt: int, computed: int, pages: int) -> Request:
        req = Request(prompt_ids=rng.randint(0, 99, prompt).tolist(), params=params, seed=computed)
        req.num_computed, req.pages = computed, rng.permutation(64)[:pages].tolist()
        return req

    decode = [RankPlan(reqs, [[rng.randint(99)] for _ in reqs], [r.num_computed for r in reqs], [True] * len(reqs),
                       [5, -1, 7][:len(reqs)])
              for reqs in ([request(10, 30, 5), request(4, 9, 2), request(6, 6, 3)], [request(8, 60, 9)])]
    prefill = [RankPlan([r := request(20, 0, 3)], [r.prompt_ids[:12]], [0], [False]), None,
               RankPlan([r := request(9, 8, 2)], [r.prompt_ids[8:]], [8], [True])]
    for plans in (decode + [None], prefill):
        step = assemble(plans, [1, 2, 4], [16], pages_per_seq=8, page_size=8)
        b, width = step.batch, step.step.page_table.shape[1]
        filled = set()
        for rank, plan in enumerate(plans):
            for i, (req, chunk, start) in enumerate(zip(plan.requests, plan.chunks, plan.starts) if plan else []):
                slot, n = rank * b + i, len(chunk)
                filled.add(slot)
                assert step.step.tokens[slot, :n].tolist() == list(chunk)
                assert step.step.positions[slot, :n].tolist() == list(range(start, start + n))
                assert step.step.valid[slot].sum() == n and step.logit_index[slot] == n - 1
                pages = req.pages[:width]
                assert step.step.page_table[slot, :len(pages)].tolist() == pages
                assert not step.step.page_table[slot, len(pages):].any()
                assert step.sources[slot] == (plan.sources[i] if plan.sources else -1)
                assert step.sampling.position[slot] == req.num_tokens and step.sampling.seed[slot] == req.seed
        empty = [s for s in range(len(plans) * b) if s not in filled]
        assert not step.step.valid[empty].any() and not step.step.page_table[empty].any()
        assert (step.sources[empty] == -1).all()
