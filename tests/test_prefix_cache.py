"""Prefix caching: the allocator's page chains, and the engine starting prompts on cached pages
with the tokens it would have computed without them."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimax_jax.kv_cache import OutOfPages, PageAllocator
from tests.test_engine import make_engine

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}


def test_a_prompt_matches_the_cached_chain_of_its_full_pages_up_to_the_first_miss():
    pool = PageAllocator(8, page_size=2)
    pages = pool.allocate(3)
    pool.remember([1, 2, 3, 4, 5], pages)                   # two full pages, the third holds one token
    assert pool.num_cached == 2
    assert pool.match([1, 2, 3, 4, 5, 6], max_pages=3) == pages[:2]
    assert pool.match([1, 2, 9, 9], max_pages=2) == pages[:1]
    assert pool.match([3, 4], max_pages=1) == []            # the same tokens after another prefix
    assert pool.match([1, 2, 3, 4], max_pages=1) == pages[:1]
    pool.free(pages)
    for _ in range(3):                                       # the holds the matches gave
        pool.free(pages[:1])
    pool.free(pages[1:2])
    assert pool.num_used == 0 and pool.num_free == 8 and pool.num_cached == 2


def test_unheld_cached_pages_are_taken_last_and_a_continuation_before_its_prefix():
    pool = PageAllocator(4, page_size=2)
    pages = pool.allocate(3)
    pool.remember([1, 2, 3, 4, 5, 6], pages)
    pool.free(pages)
    assert pool.num_free == 4 and pool.num_cached == 3
    first = pool.allocate(1)                                 # the never-used page goes first
    assert first not in pages and pool.num_cached == 3
    second = pool.allocate(1)                                # then the chain's last page
    assert second == [pages[2]] and pool.match([1, 2, 3, 4, 5, 6], max_pages=3) == pages[:2]
    pool.free(pages[:2])
    pool.allocate(2)                                         # both left: the chain is gone
    assert pool.num_cached == 0 and pool.match([1, 2, 3, 4], max_pages=2) == []
    with pytest.raises(OutOfPages):
        pool.allocate(1)


def test_flush_drops_the_cached_pages_nobody_holds_and_keeps_the_held_ones():
    pool = PageAllocator(6, page_size=2)
    kept, dropped = pool.allocate(1), pool.allocate(1)
    pool.remember([1, 2], kept)
    pool.remember([3, 4], dropped)
    pool.free(dropped)
    assert pool.flush() == 1
    assert pool.match([3, 4, 0], max_pages=1) == [] and pool.match([1, 2, 0], max_pages=1) == kept


def test_without_a_page_size_nothing_is_cached():
    pool = PageAllocator(4)
    pages = pool.allocate(2)
    pool.remember([1, 2, 3, 4], pages)
    pool.free(pages)
    assert pool.num_cached == 0 and pool.match([1, 2, 3, 4], max_pages=2) == [] and pool.num_free == 4


# a sequence of operations on a pool of 12 pages of 2 tokens: ("new", prompt) admits a sequence of
# that prompt plus one output token as the scheduler does, ("end", i) releases the i-th live one,
# ("flush", 0) empties the cache; tokens from a small alphabet so prefixes often repeat
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("new"), st.lists(st.integers(0, 2), min_size=1, max_size=9)),
    st.tuples(st.just("end"), st.integers(0, 5)),
    st.tuples(st.just("flush"), st.just(0))), max_size=40)


@settings(max_examples=150, deadline=None)
@given(OPERATIONS)
def test_every_page_is_free_cached_or_held_and_a_match_holds_the_prompts_own_tokens(operations):
    pool, size = PageAllocator(12, page_size=2), 2
    written: dict[int, tuple] = {}          # page -> the tokens up to its end whose keys it holds
    live: list[tuple[list[int], list[int]]] = []
    for op, arg in operations:
        if op == "new":
            tokens = arg + [7]
            cached = pool.match(arg, (len(arg) - 1) // size)
            for i, page in enumerate(cached):
                assert written[page] == tuple(arg[:(i + 1) * size])
            need = -(-len(tokens) // size) - len(cached)
            if need > pool.num_free:
                pool.free(cached)
                continue
            pages = cached + pool.allocate(need)
            for i in range(len(cached), len(pages)):
                written[pages[i]] = tuple(tokens[:(i + 1) * size])
            pool.remember(arg, pages)
            live.append((tokens, pages))
        elif op == "end" and live:
            tokens, pages = live.pop(arg % len(live))
            pool.remember(tokens, pages)
            pool.free(pages)
        elif op == "flush":
            pool.flush()
        held = {p for _, pages in live for p in pages}
        assert pool.num_used == len(held) and pool.num_free == pool.num_pages - len(held)
        assert len(set(pool._free)) == len(pool._free) and not set(pool._free) & (held | set(pool._key_of))
    for _, pages in live:
        pool.free(pages)
    assert pool.num_used == 0 and pool.num_free == pool.num_pages


def test_prompts_sharing_pages_start_on_them_and_get_the_tokens_computed_without_the_cache(tiny_hf_dir):
    rng = np.random.RandomState(7)
    system = rng.randint(0, 512, 10).tolist()
    prompts = [system + rng.randint(0, 512, n).tolist() for n in (3, 6, 1)]
    cold = make_engine(tiny_hf_dir, disable_radix_cache=True)
    want = [cold.generate(input_ids=p, sampling_params=GREEDY) for p in prompts]
    assert all(out["meta_info"]["cached_tokens"] == 0 for out in want)
    engine = make_engine(tiny_hf_dir)
    got = [engine.generate(input_ids=p, sampling_params=GREEDY) for p in prompts]
    assert [out["output_ids"] for out in got] == [out["output_ids"] for out in want]
    # the first request found nothing; the others the 2 pages of 4 the system prompt fills
    assert [out["meta_info"]["cached_tokens"] for out in got] == [0, 8, 8]
    # a next turn starts on the pages of the previous turn's prompt and output
    turn = prompts[0] + got[0]["output_ids"] + [5, 6]
    again = engine.generate(input_ids=turn, sampling_params=GREEDY)
    assert again["output_ids"] == cold.generate(input_ids=turn, sampling_params=GREEDY)["output_ids"]
    assert again["meta_info"]["cached_tokens"] == (len(prompts[0]) + len(got[0]["output_ids"]) - 1) // 4 * 4
    cached = engine.kv_pages_cached
    assert engine.kv_pages_used == 0 and cached > 0
    assert engine.flush_cache() == cached and engine.kv_pages_cached == 0


def test_a_full_cache_gives_its_oldest_pages_to_new_prompts(tiny_hf_dir):
    """A KV pool of 24 pages, 9 a request: each new prompt evicts what the ones before cached,
    and the tokens stay those computed without a cache."""
    rng = np.random.RandomState(8)
    prompts = [rng.randint(0, 512, 30).tolist() for _ in range(4)]
    prompts.append(prompts[0][:20] + [1, 2, 3])                # its prefix is long gone
    engine = make_engine(tiny_hf_dir, max_total_tokens=96, max_running_requests=2)
    cold = make_engine(tiny_hf_dir, max_total_tokens=96, max_running_requests=2, disable_radix_cache=True)
    for p in prompts:
        out = engine.generate(input_ids=p, sampling_params=GREEDY)
        assert out["output_ids"] == cold.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    assert out["meta_info"]["cached_tokens"] == 0
    allocator = engine.schedulers[0].allocator
    assert allocator.num_used == 0 and allocator.num_free == allocator.num_pages


def test_aborted_and_concurrent_requests_leave_no_page_held(tiny_hf_dir):
    engine = make_engine(tiny_hf_dir)
    shared = list(range(1, 13))
    reqs = [engine.submit(engine.make_request(input_ids=shared + [20 + i], sampling_params=GREEDY))
            for i in range(3)]
    engine.step()
    engine.abort(reqs[1].rid)
    engine.run_until_done()
    late = engine.generate(input_ids=shared + [40], sampling_params=GREEDY)
    assert late["meta_info"]["cached_tokens"] == 12 and engine.kv_pages_used == 0


def test_a_next_turn_joins_the_dp_rank_that_holds_its_history(tiny_hf_dir):
    """Two dp ranks: the second turn goes to the rank whose cache holds the first, though that
    rank is one request busier; with no cached pages anywhere the least loaded rank takes it."""
    engine = make_engine(tiny_hf_dir, tp_size=2, dp_size=2, enable_dp_attention=True)
    first = list(range(1, 14))
    turn = engine.generate(input_ids=first, sampling_params=GREEDY)
    home = engine.schedulers[0]
    assert home.cached_pages(first + turn["output_ids"] + [7]) == 4
    busy = engine.submit(engine.make_request(input_ids=[9] * 5, sampling_params=dict(GREEDY, max_new_tokens=30)))
    assert busy.scheduler is home                             # both idle: the first rank
    follow = engine.submit(engine.make_request(input_ids=first + turn["output_ids"] + [7], sampling_params=GREEDY))
    fresh = engine.submit(engine.make_request(input_ids=[11] * 9, sampling_params=GREEDY))
    assert follow.scheduler is home and fresh.scheduler is engine.schedulers[1]
    engine.run_until_done()
    assert follow.cached_tokens == 16 and fresh.cached_tokens == 0


def burst_scheduler(budget: int = 4096, page_size: int | None = 16):
    from minimax_jax.engine.scheduler import Scheduler
    return Scheduler(PageAllocator(10_000, page_size), 16, 64, 1024, budget)


def request(rid: str, prompt: list[int]):
    from minimax_jax.engine.sampling import SamplingParams
    from minimax_jax.engine.scheduler import Request
    return Request(rid=rid, prompt_ids=prompt, params=SamplingParams(max_new_tokens=4))


def test_a_burst_is_admitted_a_prefill_steps_worth_at_a_time():
    sched = burst_scheduler(budget=4096, page_size=None)
    rng = np.random.RandomState(9)
    for i in range(20):
        sched.add(request(str(i), rng.randint(0, 512, 900).tolist()))
    plan = sched.plan()
    assert [len(c) for c in plan.chunks] == [900] * 4 + [496]
    assert len(sched.running) == 5 and len(sched.waiting) == 15     # 5 x 900 >= 4096: the rest wait
    sched.advance(plan)
    sched.plan()
    assert len(sched.running) == 10       # the fifth's 404 left + 5 x 900 more pass the budget


def test_a_shared_system_prompt_in_a_burst_is_computed_once_and_unrelated_prompts_go_ahead():
    """Six prompts of one 100-token system prompt and two unrelated ones, submitted at once: the
    first step takes the first shared one and the unrelated ones; the other five wait for the
    system prompt's pages and start on its 6 full pages of 16."""
    rng = np.random.RandomState(10)
    system = rng.randint(0, 512, 100).tolist()
    sched = burst_scheduler()
    shared = [request(f"s{i}", system + rng.randint(0, 512, 50).tolist()) for i in range(6)]
    other = [request(f"o{i}", rng.randint(0, 512, 150).tolist()) for i in range(2)]
    for req in shared[:3] + other + shared[3:]:
        sched.add(req)
    first = sched.plan()
    assert [r.rid for r in first.requests] == ["s0", "o0", "o1"]
    assert [r.rid for r in sched.waiting] == ["s1", "s2", "s3", "s4", "s5"]
    sched.advance(first)
    second = sched.plan()
    assert [r.rid for r in second.requests] == ["s1", "s2", "s3", "s4", "s5"]
    assert [r.cached_tokens for r in shared] == [0] + [96] * 5
    assert all(len(c) == 150 - 96 for c in second.chunks)


def test_without_prefix_caching_a_burst_sharing_a_system_prompt_is_not_held_back():
    sched = burst_scheduler(page_size=None)
    system = list(range(100))
    for i in range(4):
        sched.add(request(str(i), system + [200 + i] * 20))
    assert len(sched.plan().requests) == 4


def test_a_burst_sharing_a_system_prompt_gets_the_tokens_computed_without_the_cache(tiny_hf_dir, monkeypatch):
    from minimax_jax.engine import scheduler
    monkeypatch.setattr(scheduler, "SHARED_HEAD_TOKENS", 8)           # two pages of 4: prompts fit 64 tokens
    rng = np.random.RandomState(11)
    system = rng.randint(0, 512, 10).tolist()
    prompts = [system + rng.randint(0, 512, n).tolist() for n in (3, 6, 1, 4)]
    cold = make_engine(tiny_hf_dir, disable_radix_cache=True)
    want = cold.generate(input_ids=prompts, sampling_params=GREEDY)
    engine = make_engine(tiny_hf_dir)
    got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [out["output_ids"] for out in got] == [out["output_ids"] for out in want]
    assert [out["meta_info"]["cached_tokens"] for out in got] == [0, 8, 8, 8]
    assert engine.kv_pages_used == 0


def test_a_system_prompt_longer_than_a_chunk_is_computed_once():
    """Four prompts of one 3000-token system prompt (three chunks of 1024) and 50 tokens of
    their own, submitted at once: the others wait for all of it, then start on its 187 full pages
    of 16 (2992 tokens); one unrelated prompt is not held back. A prompt scoring its own tokens
    from position 40 starts on no cached page past it, so waits only for what it can use."""
    rng = np.random.RandomState(12)
    system = rng.randint(0, 512, 3000).tolist()
    sched = burst_scheduler()
    shared = [request(f"s{i}", system + rng.randint(0, 512, 50).tolist()) for i in range(4)]
    other = request("o", rng.randint(0, 512, 500).tolist())
    scoring = request("p", system[:200] + rng.randint(0, 512, 50).tolist())
    scoring.logprob_start_len = 40
    for req in shared + [other, scoring]:
        sched.add(req)
    computed, steps = 0, 0
    while any(not r.prefilled for r in shared + [other, scoring]) and steps < 20:
        plan = sched.plan()
        computed += sum(len(c) for c in plan.chunks)
        sched.advance(plan)
        steps += 1
    assert [r.cached_tokens for r in shared] == [0] + [2992] * 3
    assert other.cached_tokens == 0 and other.prefilled
    assert scoring.cached_tokens == 32             # pages before position 39, the first it must compute
    assert computed == 3050 + 3 * 58 + 500 + 218
