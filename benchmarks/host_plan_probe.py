"""The host's time to plan one decode step, no device involved:

    python benchmarks/host_plan_probe.py [--ranks 2] [--slots 605] [--context 950] [--page-size 64]

Every dp rank's Scheduler holds --slots running requests of --context tokens, each with its
pages; the probe times `Scheduler.plan` on every rank and `assemble` of their plans into one
step (the work the engine does before each launch), median of --iters, and prints the largest
functions of assemble under cProfile. At W1's shape on DEP2 (605 slots a rank) the engine's
decode step spent 13.6 ms planning on the GPU host (docs/benchmarks.md, run FQ).
"""
import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minimax_jax.engine.sampling import SamplingParams  # noqa: E402
from minimax_jax.engine.scheduler import Request, Scheduler, assemble, powers_of_two  # noqa: E402
from minimax_jax.kv_cache import PageAllocator  # noqa: E402


def running_schedulers(args) -> list[Scheduler]:
    params = SamplingParams.from_dict({"max_new_tokens": 100, "temperature": 0.0, "ignore_eos": True})
    pages_each = -(-(args.context + 1) // args.page_size)
    rng = random.Random(0)
    schedulers = []
    for _ in range(args.ranks):
        s = Scheduler(PageAllocator(args.slots * pages_each, args.page_size), args.page_size, args.slots, 1024,
                      8192, powers_of_two(1, args.slots), powers_of_two(16, 1024))
        for i in range(args.slots):
            req = Request(prompt_ids=[1] * min(args.context, 900), params=params)
            req.num_computed = args.context
            req.pages = rng.sample(range(args.slots * pages_each), pages_each)
            req.output_ids = [5] * (args.context - len(req.prompt_ids))
            req.pending, req.pending_slot = 1, i
            s.running.append(req)
        schedulers.append(s)
    return schedulers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--slots", type=int, default=605, help="running requests a rank")
    p.add_argument("--context", type=int, default=950, help="tokens each request has computed")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    schedulers = running_schedulers(args)
    pages_per_seq = -(-(args.context + 128) // args.page_size)
    buckets = powers_of_two(1, args.slots)

    def one_step():
        plans = [s.plan() for s in schedulers]
        planned = time.perf_counter()
        assemble(plans, buckets, powers_of_two(16, 1024), pages_per_seq, args.page_size)
        return planned

    plan_s, assemble_s = [], []
    for _ in range(args.iters):
        start = time.perf_counter()
        planned = one_step()
        done = time.perf_counter()
        plan_s.append(planned - start)
        assemble_s.append(done - planned)
    print(f"{args.ranks} ranks x {args.slots} decode slots: plan {statistics.median(plan_s) * 1e3:.2f} ms, "
          f"assemble {statistics.median(assemble_s) * 1e3:.2f} ms (median of {args.iters})")
    profile = cProfile.Profile()
    profile.enable()
    one_step()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
