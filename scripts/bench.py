"""Benchmarks of minimax-jax on the devices at hand (GPUs, or CPUs with --smoke).

Sections (pick with --sections, comma separated):
  env       versions, devices, measured copy bandwidth (a chain of copies, and on GPUs also on the
            device timeline) and bf16 matmul rate (the ceilings)
  check     greedy tokens of a 2-layer full-width model (experts as --quantization): Mosaic vs
            XLA expert GEMM, DEP vs 1 device
  check-long the same at a prefill of 4 x 1000 tokens over DEP on all devices: the XLA path
            against itself run again, then each kernel against the XLA reference of its own
            numbers (mosaic-ws against xla, mosaic-ws-w8a8 against xla-w8a8) and the W8A8
            rounding itself (xla-w8a8 against xla), --check-kernels to pick; with the
            experts split over two or more devices the row buckets (a switch over row counts) run
  kernels   expert grouped GEMM: lax.ragged_dot vs Mosaic GPU at decode and prefill sizes,
            checked against each other, beside the weight-read floor and a dense batched matmul
            of equal groups (the rate a grouped kernel could reach); FP8 experts dequantised in
            XLA vs dequantised inside the Mosaic kernel
  attention attention over the paged cache on one device, each against an fp32 reference:
            prefill chunks (XLA reference vs cuDNN flash attention, and for a first chunk cuDNN
            over the chunk's own keys, causal) and decode (XLA reference vs the Pallas kernel)
  layouts   DEP (FP4 and bf16 dispatch) against TP over all devices at --engine-layers depth:
            first-step logits and 16 greedy tokens of 8 prompts (the 8-GPU issue's criteria)
  layers    one decode step of a full-width model at two depths on each layout (DEP with FP4
            or bf16 all-gather, TP with and without the fused reduce-scatter + norm): per-layer
            time from the difference, beside its floor (weights + KV bytes over bandwidth)
  breakdown each piece of one decode layer alone on one device, beside its floor
  engine    a workload (--workload W1, W2, W3 or --requests/--prompt/--output/
            --max-running-requests) through Engine, or with --url through a running server's
            OpenAI API: output tok/s, TTFT and TPOT percentiles, the decode step beside its floor
            (weights + KV bytes over bandwidth, plus the step's collectives replayed alone)
  moe       the routed-experts block of one layer alone (sort, row layout, both grouped GEMMs,
            combine) as one expert-parallel rank sees it, FP8 experts, at --moe-tokens (decode
            or prefill sizes): device time per call from a profiler trace, its largest kernels,
            beside the weight-read floor; up to 8192 tokens each kernel's output against its XLA
            reference (mosaic-ws-w8a8 against xla-w8a8, the others against xla)
  profile   a perfetto trace of a few engine steps (--profile-phase prefill or decode), device
            time per kernel
  hf        transformers' MiniMaxM2ForCausalLM at the same depth and batch on one GPU, beside
            this engine on one GPU (bf16, its prefix cache off): output tok/s of one batched
            greedy generate of --hf-new tokens after --prompt, prefill included

Every figure printed is measured in this run; the table at the end is the summary, the full log
goes to --out (default $OUT or ./bench-out). Multicast stays off in NCCL (NCCL_NVLS_ENABLE=0).

--xla-flag-sets runs the chosen sections once per named set of XLA flags (command buffers,
latency-hiding scheduler; see XLA_FLAG_SETS), each in its own process, and prints them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimax_jax.process_env import apply_defaults  # noqa: E402

apply_defaults()            # before JAX starts: multicast off, XLA's pool 92% of each card

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minimax_jax.engine.runner import COMMAND_BUFFERS_EVERYWHERE  # noqa: E402

ROWS: list[dict] = []

# XLA GPU options the GPU issue asks to measure on and off, added to any XLA_FLAGS already set
XLA_FLAG_SETS = {
    "default": "",
    "command-buffers-off": "--xla_gpu_enable_command_buffer=",
    # what --cuda-graph-max-bs compiles into small decode steps, for every executable of the process
    "command-buffers-all": " ".join(f"--{name}={value}" for name, value in COMMAND_BUFFERS_EVERYWHERE.items()),
    # cuBLAS reads a layer's weights in place in the stacked array instead of copying them out
    "dynamic-slice-fusion": "--xla_gpu_enable_dynamic_slice_fusion=true",
    "cublas-dynamic-slice": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true",
    # XLA's own one-shot kernel for small single-host all-reduces instead of NCCL's
    "one-shot-all-reduce": "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true",
    # no merging of dots that share an operand: merging q/k/v concatenates their weights every step
    "no-dot-merger": "--xla_disable_hlo_passes=dot-merger",
    "latency-hiding-off": "--xla_gpu_enable_latency_hiding_scheduler=false",
    "latency-hiding-on": "--xla_gpu_enable_latency_hiding_scheduler=true",
}


def record(section: str, variant: str, value: float, unit: str, note: str = "") -> None:
    row = dict(section=section, variant=variant, value=value, unit=unit, note=note)
    ROWS.append(row)
    print(f"[{section}] {variant}: {value:.4g} {unit} {note}", flush=True)


def median_time(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# -- env ---------------------------------------------------------------------------------------

def bench_env(args) -> dict:
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    key = jax.random.PRNGKey(0)
    copy, x = copy_case(args.copy_elems)
    bandwidth = copy_bandwidth(copy, x)
    record("env", "copy bandwidth (read+write)", bandwidth / 1e12, "TB/s",
           f"{args.copy_elems * 2 / 2**30:.1f} GiB bf16, 20 copies back to back")
    if jax.default_backend() == "gpu":     # a CPU's trace has no device timeline
        trace = device_time(copy, x, trace_dir=Path(args.out) / "trace-copy")
        record("env", "copy bandwidth, device timeline", 2 * x.nbytes / (sum(trace.device.values()) * 1e-6) / 1e12,
               "TB/s", "the same copy's kernel time (a cross-check: floors divide by the figure above)")
    n = args.matmul_n
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    t = median_time(jax.jit(jnp.dot), a, b)
    record("env", f"bf16 matmul {n}^3", 2 * n**3 / t / 1e12, "TFLOP/s")
    return {"bandwidth": bandwidth, "matmul": 2 * n**3 / t}


# -- kernels -----------------------------------------------------------------------------------

MOSAIC_CONFIGS = [  # block_m, block_n, block_k, max_concurrent_steps, grid_block_n
    (64, 128, 64, 4, 1), (64, 256, 64, 4, 1), (128, 128, 64, 4, 1), (128, 256, 64, 3, 2), (64, 128, 128, 3, 1),
]


def mosaic_variants() -> dict:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    out = {}
    for bm, bn, bk, steps, gbn in MOSAIC_CONFIGS:
        fn = functools.partial(ragged_dot_mgpu.ragged_dot, block_m=bm, block_n=bn, block_k=bk,
                               max_concurrent_steps=steps, grid_block_n=gbn)
        out[f"mosaic{bm}x{bn}x{bk}s{steps}g{gbn}"] = lambda x, w, sizes, fn=fn: fn(x, w, group_sizes=sizes)
    return out


# block_m, block_n (per compute warpgroup), block_k, stages of the warp-specialised kernel; the
# first is moe.WS_BLOCK_ROWS's
WS_CONFIGS = [(128, 128, 64, 3), (128, 128, 64, 4), (256, 64, 64, 3)]


def bench_kernels(args, ceilings: dict) -> None:
    from minimax_jax.ops import moe as moe_ops
    if args.quantization == "fp8":
        return bench_fp8_kernels(args, ceilings)
    kernels = {"xla": moe_ops.ragged_dot_reference}
    if jax.default_backend() == "gpu":
        kernels.update(mosaic_variants() if args.tune else {"mosaic": moe_ops.ragged_dot_mosaic})
    g, k, n = args.local_experts, args.hidden, 2 * args.intermediate
    key = jax.random.PRNGKey(0)
    w = (jax.random.normal(key, (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    skip = (lambda name, m: name == "xla" and args.tune and m > 4096)
    time_grouped_gemms(args, kernels, (w,), (k, n), w.nbytes / ceilings["bandwidth"], "floor", skip)
    if jax.default_backend() == "gpu":
        time_dense_batched(args, k, n)


def time_grouped_gemms(args, kernels: dict, weights: tuple, k_n: tuple[int, int], floor: float,
                       floor_name: str, skip, label: str = "") -> None:
    """Times each kernel fn(x, *weights, group_sizes) ([M, K] rows into [M, N]) at each
    --kernel-rows, with all rows or a quarter routed to this device, checked against the first
    kernel that ran."""
    g, (k, n) = args.local_experts, k_n
    failed: set = set()
    for m in args.kernel_rows:
        x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
        # expert parallel: only a quarter of the rows are routed to this device's experts
        for share in (1.0, 0.25):
            rows = int(m * share)
            sizes = jnp.asarray(np.random.RandomState(3).multinomial(rows, np.ones(g) / g), jnp.int32)
            valid = np.arange(m) < int(sizes.sum())
            ref = None
            for name, fn in kernels.items():
                if name in failed or skip(name, m):
                    continue
                f = jax.jit(fn)
                try:
                    out = np.asarray(f(x, *weights, sizes).astype(jnp.float32))[valid]
                except Exception as e:
                    print(f"[kernels] {name} m={m} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    traceback.print_exc(limit=-3)
                    failed.add(name)
                    continue
                ref = out if ref is None else ref
                err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
                t = median_time(f, x, *weights, sizes)
                flops = 2 * int(sizes.sum()) * k * n
                record("kernels", f"{label}{name} m={m} routed={share:.2f}", t * 1e3, "ms",
                       f"{floor_name} {floor * 1e3:.3f} ms ({floor / t:.0%}), {flops / t / 1e12:.0f} TFLOP/s, "
                       f"rel err {err:.1e}")


def bench_fp8_kernels(args, ceilings: dict) -> None:
    """FP8 block-scaled experts: dequantise in XLA then the bf16 grouped GEMM, against the
    kernels that read FP8 weights; floor = the FP8 bytes over bandwidth. The gate/up shape, and
    with --fp8-fused the down projection's too."""
    shapes = [("", 2 * args.intermediate, args.hidden)]
    if args.fp8_fused:
        shapes.append(("down: ", args.hidden, args.intermediate))
    for label, n, k in shapes:
        _bench_fp8_kernels(args, ceilings, label, n, k)


def _bench_fp8_kernels(args, ceilings: dict, label: str, n: int, k: int) -> None:
    from minimax_jax.ops import aligned_rows, grouped_gemm_fp8, grouped_gemm_ws, mosaic_common, moe as moe_ops
    from quant import fp8
    g = args.local_experts
    w, scale = fp8.quantize_blockwise(jax.random.normal(jax.random.PRNGKey(0), (g, n, k), jnp.float32) * 0.02)
    floor = w.nbytes / ceilings["bandwidth"]
    on_gpu = jax.default_backend() == "gpu"
    kernels = {"fp8 dequant+xla": grouped_gemm_fp8.reference}
    if on_gpu:
        kernels["fp8 dequant+mosaic"] = lambda x, w, s, sizes: moe_ops.ragged_dot_mosaic(
            x, fp8.dequantize_blockwise(w, s, jnp.bfloat16), sizes, transpose_rhs=True)
        # the warp-specialised bf16 kernel on dequantised weights: rows per tile, columns per
        # compute warpgroup, depth per stage, stages
        for bm, bn, bk, steps in WS_CONFIGS:
            def dequant_ws(x, w, s, sizes, bm=bm, bn=bn, bk=bk, steps=steps):
                gemm = functools.partial(grouped_gemm_ws.aligned_gemm, w=fp8.dequantize_blockwise(w, s, jnp.bfloat16),
                                         block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps)
                return aligned_rows.on_aligned_rows(gemm, x, sizes, bm)
            kernels[f"fp8 dequant+ws bm{bm} bn{bn} bk{bk} s{steps}"] = dequant_ws
        # variants of the kernels that read FP8 weights (--fp8-fused): rows per tile (bm),
        # pipeline depth (s), thread blocks per SM (the persistent grid over the SM count), W8A8
        # (rows rounded to FP8; its error is against the weight-only reference). Measured
        # configurations first: a kernel that faults ends every later timing of the run.
        sms = mosaic_common.sm_count()
        variants = [("fused", 64, 2, 2), ("fused", 128, 2, 1), ("w8a8", 64, 4, 1), ("w8a8", 64, 2, 2),
                    ("w8a8", 128, 2, 1)] if args.fp8_fused else []
        for kind, bm, steps, per_sm in variants:
            gemm = grouped_gemm_fp8.grouped_gemm_w8a8 if kind == "w8a8" else grouped_gemm_fp8.grouped_gemm_fp8
            kernels[f"fp8 {kind} bm{bm} s{steps} x{per_sm}/SM"] = functools.partial(
                gemm, block_m=bm, max_concurrent_steps=steps, num_blocks=per_sm * sms)
        # the W8A8 warp-specialised kernel (rows rounded to FP8 per 128 columns; its error is
        # against the weight-only reference) by pipeline stages
        for steps in (3, 4, 5):
            def w8a8_ws(x, w, s, sizes, steps=steps):
                gemm = functools.partial(grouped_gemm_ws.aligned_gemm_w8a8, w=w, w_scale=s, max_concurrent_steps=steps)
                return aligned_rows.on_aligned_rows(gemm, x, sizes, moe_ops.WS_BLOCK_ROWS)
            kernels[f"fp8 w8a8-ws s{steps}"] = w8a8_ws
    skip = (lambda name, m: name == "fp8 dequant+xla" and on_gpu and m > 4096)
    time_grouped_gemms(args, kernels, (w, scale), (k, n), floor, "fp8 floor", skip, label)
    if on_gpu:
        time_dense_batched(args, k, n, label)
    if on_gpu and args.fp8_fused:
        _time_fp8_fixed_costs(args, w, scale, label, n, k)


def time_dense_batched(args, k: int, n: int, label: str = "") -> None:
    """The rate a grouped GEMM could reach at these shapes: every expert given the same number of
    rows (--kernel-rows over --local-experts), one batched bf16 matmul through XLA (cuBLAS)."""
    g = args.local_experts
    for m in args.kernel_rows:
        x = jax.random.normal(jax.random.PRNGKey(m), (g, m // g, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.PRNGKey(1), (g, n, k), jnp.bfloat16)
        f = jax.jit(lambda x, w: jnp.einsum("gmk,gnk->gmn", x, w, preferred_element_type=jnp.float32).astype(x.dtype))
        t = median_time(f, x, w)
        record("kernels", f"{label}dense batched bf16 (XLA), {g} x {m // g} rows", t * 1e3, "ms",
               f"{2 * m * k * n / t / 1e12:.0f} TFLOP/s: the ceiling for equal groups")


def _time_fp8_fixed_costs(args, w, scale, label: str, n: int, k: int) -> None:
    """What the default FP8 kernel's call costs besides its work on rows: the same call with no
    rows routed (every tile skipped), and the group-aligned row layout alone (its index
    arithmetic and both gathers, the kernel replaced by a copy of the rows), beside a trivial
    jitted op (the timing's own dispatch floor)."""
    from minimax_jax.ops import aligned_rows, grouped_gemm_fp8

    layout_only = jax.jit(lambda x, w, s, sizes: aligned_rows.on_aligned_rows(
        lambda x_aligned, block_group: jnp.tile(x_aligned, (1, n // k)), x, sizes, block_m=64))
    default = jax.jit(grouped_gemm_fp8.grouped_gemm_fp8)
    for m in args.kernel_rows:
        x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
        sizes = jnp.asarray(np.random.RandomState(3).multinomial(m // 4, np.ones(len(w)) / len(w)), jnp.int32)
        no_rows = jnp.zeros_like(sizes)
        for name, f, group_sizes in (("fp8 fused default, no rows routed", default, no_rows),
                                     ("fp8 fused default", default, sizes),
                                     ("row layout alone (kernel replaced by a copy)", layout_only, sizes)):
            record("kernels", f"{label}{name} m={m} routed=0.25", median_time(f, x, w, scale, group_sizes) * 1e3, "ms")
        record("kernels", f"{label}dispatch floor (x + 1, jitted) m={m}", median_time(jax.jit(lambda x: x + 1), x) * 1e3, "ms")


# -- attention ---------------------------------------------------------------------------------

def bench_attention(args) -> None:
    """Attention over the paged cache on one device, each backend beside an fp32 reference on the
    same inputs, at the model's 48 query and 8 KV heads of 128 with --page-size pages in
    --kv-cache-dtype. Prefill: 4 slots of --chunk tokens, a first chunk (keys 0..T-1) and one
    continuing it (the mask must see the earlier chunk). Decode: --decode-tokens slots with
    contexts drawn up to --context, read from the second layer of the cache."""
    from minimax_jax.engine.engine import KV_CACHE_DTYPES
    cache_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] or jnp.bfloat16
    t = args.chunk
    for start in (0, t):
        flops = 4 * 4 * 48 * 128 * (t * start + t * t / 2)        # QK^T and PV over the visible keys
        case = _attention_case(4, t, start + t, cache_dtype, args.page_size, seed=start)
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (4, t))
        for backend in ("xla", "cudnn", "cudnn fresh")[:3 if start == 0 else 2]:
            options = dict(backend="cudnn", chunk_kv=_chunk_kv(case, t)) if backend == "cudnn fresh" else \
                dict(backend=backend)
            t_s, err = _time_attention(case, positions, options)
            record("attention", f"prefill {backend} 4x{t} queries, keys from {start}", t_s * 1e3, "ms",
                   f"rel err vs fp32 {err:.1e}, {flops / t_s / 1e12:.0f} TFLOP/s, {args.kv_cache_dtype} cache")
    b, context = args.decode_tokens, args.context
    case = _attention_case(b, 1, context, cache_dtype, args.page_size, seed=1)
    positions = jnp.asarray(np.random.RandomState(2).randint(context // 2, context, (b, 1)), jnp.int32)
    kv_bytes = 2 * int(jnp.sum(positions + 1)) * 8 * 128 * jnp.dtype(cache_dtype).itemsize
    for backend in ("xla", "pallas"):
        t_s, err = _time_attention(case, positions, dict(decode_backend=backend))
        record("attention", f"decode {backend} {b} slots, contexts up to {context}", t_s * 1e3, "ms",
               f"rel err vs fp32 {err:.1e}, keys and values read at {kv_bytes / t_s / 1e12:.2f} TB/s")
    if jax.default_backend() == "gpu":      # keys per block, warps, pipeline stages (default: 64, 4, 2)
        from minimax_jax.ops import decode_attention
        for block_keys, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 4, 4), (64, 4, 4), (32, 4, 4)):
            kernel = functools.partial(decode_attention.paged_decode_attention, block_keys=block_keys,
                                       num_warps=warps, num_stages=stages)
            t_s, err = _time_attention(case, positions, {}, kernel)
            record("attention", f"decode pallas {block_keys} keys/block {warps} warps {stages} stages", t_s * 1e3,
                   "ms", f"rel err vs fp32 {err:.1e}, keys and values read at {kv_bytes / t_s / 1e12:.2f} TB/s")


def _attention_case(slots: int, queries: int, keys: int, cache_dtype, page_size: int, seed: int):
    """q [slots, queries, 48, 128] and a two-layer cache whose second layer holds each slot's
    keys on shuffled pages."""
    rng = jax.random.split(jax.random.PRNGKey(seed), 4)
    per_slot = -(-keys // page_size)
    pages = slots * per_slot
    k_cache, v_cache = (jax.random.normal(key, (2, pages, page_size, 8, 128), jnp.float32).astype(cache_dtype)
                        for key in rng[:2])
    page_table = jax.random.permutation(rng[2], pages).reshape(slots, per_slot).astype(jnp.int32)
    q = jax.random.normal(rng[3], (slots, queries, 48, 128), jnp.bfloat16)
    return q, k_cache, v_cache, page_table


def _chunk_kv(case, t: int) -> tuple[jax.Array, jax.Array]:
    """The first t keys and values of each slot, as a fresh chunk hands them to attention
    (`StepInput.fresh`): here read from the case's cache, so the fp32 reference sees the same."""
    from minimax_jax.ops import attention as attn_ops
    q, k_cache, v_cache, page_table = case
    keys, values = attn_ops.gather_pages(k_cache, v_cache, page_table, jnp.int32(1), q.dtype)
    return keys[:, :t], values[:, :t]


def _time_attention(case, positions, backends: dict, attention=None) -> tuple[float, float]:
    """Time and error against fp32 of attention (default: paged_attention with these backends)."""
    from minimax_jax.ops import attention as attn_ops
    q, k_cache, v_cache, page_table = case
    inputs = (q, k_cache, v_cache, page_table, positions, jnp.int32(1))
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(attn_ops.paged_attention_reference(q.astype(jnp.float32), *inputs[1:]))
    f = jax.jit(attention or (lambda *a: attn_ops.paged_attention(*a, **backends)))
    out = np.asarray(f(*inputs).astype(jnp.float32))
    return median_time(f, *inputs), float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# -- layers ------------------------------------------------------------------------------------

LAYOUTS = {
    "DEP fp4-gather": dict(dp_size=-1, enable_dp_attention=True, moe_dispatch_fp4=True),
    "DEP bf16-gather": dict(dp_size=-1, enable_dp_attention=True, moe_dispatch_fp4=False),
    "TP ar-fusion": dict(enable_ar_fusion=True),
    "TP no-fusion": dict(enable_ar_fusion=False, moe_combine="all_reduce"),
}


def decode_step_inputs(engine, batch_per_rank: int, context: int):
    """A decode step: every slot of every rank at position `context`, its pages distinct."""
    from minimax_jax.engine.sampling import SamplingBatch
    from minimax_jax.model import StepInput
    d, ps = engine.layout.dp, engine.args.page_size
    pages = -(-(context + 1) // ps)
    slots = d * batch_per_rank
    table = np.stack([np.arange(pages) + (i % batch_per_rank) * pages for i in range(slots)]).astype(np.int32)
    step = StepInput(tokens=np.arange(slots, dtype=np.int32)[:, None] % engine.cfg.vocab_size,
                     positions=np.full((slots, 1), context, np.int32), valid=np.ones((slots, 1), bool),
                     page_table=table)
    sampling = SamplingBatch.build([None] * slots, [0] * slots, [0] * slots, slots)
    return step, np.zeros(slots, np.int32), sampling


def layer_engine(args, layers: int, flags: dict, batch_per_rank: int):
    from minimax_jax.engine.engine import Engine
    n = len(jax.devices())
    flags = {k: (n if v == -1 else v) for k, v in flags.items()}
    pages_per_rank = batch_per_rank * -(-(args.context + 1) // args.page_size)
    return Engine(model_path=args.preset, load_format="dummy", tp_size=n, ep_size=n, dtype="bfloat16",
                  quantization=args.quantization, page_size=args.page_size,
                  max_total_tokens=pages_per_rank * args.page_size, context_length=args.context + 64,
                  max_running_requests=batch_per_rank * n,
                  json_model_override_args=json.dumps({"num_hidden_layers": layers}), **flags)


def first_step_logits(engine, prompts) -> np.ndarray:
    """fp32 logits of each prompt's last token, one prefill step on the engine's mesh."""
    from minimax_jax.engine.scheduler import RankPlan, assemble
    runner = engine.runner
    d = engine.layout.dp
    plans = [RankPlan([], [], [], []) for _ in range(d)]
    for i, ids in enumerate(prompts):
        req = engine.make_request(input_ids=ids, sampling_params={"max_new_tokens": 1})
        req.pages = list(range(i // d * engine.pages_per_seq, (i // d + 1) * engine.pages_per_seq))
        plan = plans[i % d]
        plan.requests.append(req); plan.chunks.append(ids); plan.starts.append(0); plan.samples.append(True)
    step = assemble(plans, engine.batch_buckets, engine.token_buckets, engine.pages_per_seq, engine.args.page_size)
    put = lambda x: jax.device_put(np.asarray(x), runner._slots)
    logits, _, _ = jax.jit(runner.forward)(runner.state, runner.kv, jax.tree.map(put, step.step), put(step.logit_index))
    rows = [rank * step.batch + i for rank, p in enumerate(plans) for i in range(len(p.requests))]
    order = np.argsort([j for rank in range(d) for j in range(len(prompts)) if j % d == rank])
    return np.asarray(logits)[rows][order]


def compare_engines(section: str, common: dict, variants: dict, prompts: list) -> list[tuple[str, float, float]]:
    """Builds each variant's Engine(**common, **flags) in turn, the first being the baseline, and
    returns for each that ran: (name, max first-step logit difference / max |baseline logit|,
    fraction of the 16 greedy tokens equal to the baseline's)."""
    runs = run_engines(section, common, variants, prompts)
    base = next(iter(variants))
    return [(name, *agreement(runs, name, base)) for name in runs[0]] if base in runs[0] else []


def run_engines(section: str, common: dict, variants: dict, prompts: list) -> tuple[dict, dict]:
    """Each variant's first-step logits and 16 greedy tokens per prompt (by variant name), for
    the variants whose Engine(**common, **flags) ran; a failure is printed and the rest go on."""
    from minimax_jax.engine.engine import Engine
    params = {"max_new_tokens": 16, "temperature": 0.0}
    logits, outs = {}, {}
    for name, flags in variants.items():
        try:
            engine = Engine(**common, **flags)
            first = first_step_logits(engine, prompts)
            outs[name] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
            logits[name] = first                # only variants that ran both count
            del engine
        except Exception as e:              # report and go on: the other variants still run
            print(f"[{section}] {name} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return logits, outs


def agreement(runs: tuple[dict, dict], name: str, base: str) -> tuple[float, float]:
    """(max logit difference / max |base logit|, fraction of greedy tokens equal) of two runs."""
    logits, outs = runs
    ref = logits[base]
    return (float(np.abs(logits[name] - ref).max() / np.abs(ref).max()),
            float(np.mean([a == b for x, y in zip(outs[name], outs[base]) for a, b in zip(x, y)])))


# the GPU issue's workloads (random token prompts, greedy, ignore_eos)
WORKLOADS = {
    "W1": dict(what="GSM8K-shaped, 1209 requests of 900 in / 100 out submitted at once, DEP",
               requests=1209, prompt=900, output=100, engine_layout="dep"),
    "W2": dict(what="512 requests of 1000 in / 1000 out, 256 in flight, DEP",
               requests=512, prompt=1000, output=1000, max_running_requests=256, engine_layout="dep"),
    "W3": dict(what="one request of 1000 in / 1000 out, TP with every expert split over the devices",
               requests=1, prompt=1000, output=1000, engine_layout="tp", ep_size=1),
}
ENGINE_DEFAULTS = dict(requests=256, prompt=900, output=100, engine_layout="dep")


def bench_check(args) -> None:
    """Greedy tokens and logits of one full-width random model (2 layers, DEP over all devices)
    with the Mosaic grouped GEMM against the XLA reference, and against one device."""
    n = len(jax.devices())
    common = dict(model_path=args.preset, load_format="dummy", dtype="bfloat16", page_size=args.page_size,
                  quantization=args.quantization,
                  context_length=256, max_running_requests=8, chunked_prefill_size=128,
                  json_model_override_args=json.dumps({"num_hidden_layers": 2}))
    prompts = [list(range(1 + i, 40 + 7 * i)) for i in range(4)]
    dep = dict(tp_size=n, dp_size=n, enable_dp_attention=True)
    variants = {"1 device xla": dict(moe_kernel="xla", attention_backend="xla"),
                f"DEP{n} xla": dict(moe_kernel="xla", attention_backend="xla", **dep),
                f"DEP{n} mosaic": dict(moe_kernel="mosaic", attention_backend="xla", **dep),
                f"DEP{n} mosaic cudnn-attn": dict(moe_kernel="mosaic", attention_backend="cudnn", **dep)}
    if args.quantization == "fp8":
        for kernel in ("mosaic-ws", "mosaic-fp8", "mosaic-w8a8", "mosaic-ws-w8a8"):
            variants[f"DEP{n} {kernel}"] = dict(moe_kernel=kernel, attention_backend="xla", **dep)
    for name, diff, same in compare_engines("check", common, variants, prompts):
        record("check", f"prefill logits {name} vs 1 device xla", diff, "x max|logit|", "last prompt token")
        record("check", f"greedy tokens {name} vs 1 device xla", same, "fraction equal", "4 prompts x 16 tokens")


def bench_check_long(args) -> None:
    """bench_check's comparison at prefill size: 4 prompts of 1000 tokens in one step over DEP on
    all devices (32000 token-expert pairs: above 16384, with the experts split over two or more
    devices, the row buckets of ops.moe.row_capacities run under a switch; one device has one
    bucket). First "xla" against itself run again (their difference is the comparison's noise);
    then each kernel against the XLA reference of its own numbers: the weight-only kernels
    against "xla", the W8A8 one against "xla-w8a8" (the same rounding of the rows), and that
    rounding itself ("xla-w8a8" against "xla"). --check-kernels keeps the pairs of the kernels
    named, with their references."""
    from minimax_jax.config import preset
    n = len(jax.devices())
    common = dict(model_path=args.preset, load_format="dummy", dtype="bfloat16", page_size=args.page_size,
                  quantization=args.quantization, context_length=2048, max_running_requests=8,
                  chunked_prefill_size=4096, json_model_override_args=json.dumps({"num_hidden_layers": 2}),
                  tp_size=n, dp_size=n, enable_dp_attention=True, attention_backend="xla",
                  # little KV is needed; the fp32 reference of the W8A8 path dequantises a layer's
                  # experts to fp32 (14.5 GB for all 256 on one GPU)
                  mem_fraction_static=0.5)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(1, preset(args.preset).vocab_size, 1000).tolist() for _ in range(4)]
    # the same path twice first: whether two runs of one program land apart, the scale for the rest
    pairs = [("xla, again", "xla")]
    if jax.default_backend() == "gpu":      # the Mosaic kernels need a GPU; on CPUs the path still runs
        pairs += [("mosaic-ws", "xla"), ("xla-w8a8", "xla"), ("mosaic-ws-w8a8", "xla-w8a8"),
                  ("mosaic-ws-w8a8", "xla")] if args.quantization == "fp8" else [("mosaic", "xla")]
    if args.check_kernels:                  # the chosen kernels and what they are compared with
        chosen = args.check_kernels.split(",")
        pairs = [(name, base) for name, base in pairs if name.split(",")[0] in chosen]
    kernels = {name: name.split(",")[0] for pair in pairs for name in pair}
    runs = run_engines("check-long", common, {name: dict(moe_kernel=k) for name, k in kernels.items()}, prompts)
    for name, base in pairs:
        if name in runs[0] and base in runs[0]:
            diff, same = agreement(runs, name, base)
            record("check-long", f"prefill logits DEP{n} {name} vs {base}", diff, "x max|logit|", "4 x 1000-token prompts")
            record("check-long", f"greedy tokens DEP{n} {name} vs {base}", same, "fraction equal", "4 prompts x 16 tokens")


def bench_layouts(args) -> None:
    """The seed's CI comparison at --engine-layers depth: DEP (tp = dp = ep = all devices, DP
    attention; FP4 and bf16 dispatch) against TP (tp = ep = all devices) on one fixed greedy
    workload: first-step logits (criterion 2e-2 x max|logit|) and greedy tokens of the first 16
    positions (criterion >= 95% equal)."""
    from minimax_jax.config import preset
    n = len(jax.devices())
    common = dict(model_path=args.preset, load_format="dummy", dtype="bfloat16", quantization=args.quantization,
                  page_size=args.page_size, context_length=256, max_running_requests=8, chunked_prefill_size=128,
                  json_model_override_args=json.dumps({"num_hidden_layers": args.engine_layers}),
                  **kv_cache_flags(args))
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, preset(args.preset).vocab_size, 24 + 9 * i).tolist() for i in range(8)]
    dep = dict(tp_size=n, dp_size=n, ep_size=n, enable_dp_attention=True)
    variants = {f"TP{n}": dict(tp_size=n, ep_size=n),
                f"DEP{n} fp4-dispatch": dict(dep, moe_dispatch_fp4=True),
                f"DEP{n} bf16-dispatch": dict(dep, moe_dispatch_fp4=False)}
    for name, diff, same in compare_engines("layouts", common, variants, prompts)[1:]:
        tag = f"{name} vs TP{n}, {args.engine_layers} layers"
        record("layouts", f"first-step logits {tag}", diff, "x max|logit|",
               f"criterion <= 0.02: {'met' if diff <= 0.02 else 'NOT met'}")
        record("layouts", f"greedy tokens {tag}", same, "fraction equal",
               f"8 prompts x 16 positions; criterion >= 0.95: {'met' if same >= 0.95 else 'NOT met'}")


def bench_layers(args, ceilings: dict) -> None:
    from minimax_jax.config import preset
    cfg = preset(args.preset)
    n = len(jax.devices())
    tokens = args.decode_tokens
    for name, flags in LAYOUTS.items():
        dp = n if flags.get("enable_dp_attention") else 1
        times = {}
        try:
            for layers in args.depths:
                engine = layer_engine(args, layers, flags, tokens // dp)
                step, logit_index, sampling = decode_step_inputs(engine, tokens // dp, args.context)
                times[layers] = median_time(lambda: engine.runner.run(step, logit_index, sampling), iters=args.iters)
                del engine
        except Exception as e:
            print(f"[layers] {name} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        lo, hi = min(args.depths), max(args.depths)
        per_layer = (times[hi] - times[lo]) / (hi - lo)
        floor = layer_floor(cfg, tokens, args.context, n, args.quantization) / ceilings["bandwidth"]
        record("layers", f"{name} decode {tokens} tok", per_layer * 1e6, "us/layer",
               f"floor {floor * 1e6:.0f} us ({floor / per_layer:.0%}); step {hi} layers {times[hi] * 1e3:.2f} ms, "
               f"{lo} layers {times[lo] * 1e3:.2f} ms")


def layer_floor(cfg, tokens: int, context: int, devices: int, quantization) -> float:
    """Bytes one device must read per layer at decode: its share of the routed experts' weights
    (the distinct experts the batch touches), attention weights, and the KV cache."""
    bytes_per_weight = {None: 2, "fp8": 1, "modelopt_fp4": 0.5625}[quantization]
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * bytes_per_weight
    touched = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens)
    from minimax_jax.loader import QUANTIZATION_TO_FORMAT
    from minimax_jax.model import attention_format
    attention_bytes = 1 if attention_format(cfg, QUANTIZATION_TO_FORMAT[quantization]) == "fp8" else 2
    attention = attention_bytes * cfg.hidden_size * (2 * cfg.q_size + 2 * cfg.kv_size)
    kv = tokens * context * 2 * cfg.kv_size * 2
    return (touched * expert + attention + kv) / devices


def bench_breakdown(args, ceilings: dict) -> None:
    """Each piece of one decode layer alone, at the shapes of a --decode-tokens batch on one
    device: where the layer's time goes, beside each piece's own floor."""
    from flax import nnx
    from minimax_jax.config import preset
    from minimax_jax.model import DecoderLayer, LocalComm, StepInput, rms_norm
    from minimax_jax.ops import attention as attn_ops
    cfg = preset(args.preset)
    b, ctx, ps = args.decode_tokens, args.context, args.page_size
    layer = DecoderLayer(cfg, jnp.bfloat16, nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    key = jax.random.PRNGKey(0)
    h = jax.random.normal(key, (b, cfg.hidden_size), jnp.bfloat16)
    pages = -(-(ctx + 1) // ps)
    cache = jax.random.normal(key, (1, b * pages, ps, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    step = StepInput(tokens=jnp.zeros((b, 1), jnp.int32), positions=jnp.full((b, 1), ctx, jnp.int32),
                     valid=jnp.ones((b, 1), bool), page_table=jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages))
    bw = ceilings["bandwidth"]

    def attention(state, h, k, v):
        return nnx.merge(graphdef, state).attn(h, (k, v), jnp.int32(0), step, LocalComm())[0]

    def moe(state, h):
        layer = nnx.merge(graphdef, state)
        ids, w = layer.router(h, jnp.ones((b,), bool))
        return layer.experts(h, ids, w, first_expert=0)

    def attention_core(q, k, v):
        return attn_ops.paged_attention(q, k, v, step.page_table, step.positions, jnp.int32(0),
                                        attn_ops.resolve_backend(args.attention_backend))

    q = jax.random.normal(key, (b, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    kv_bytes = 2 * b * (ctx + 1) * cfg.kv_size * 2
    touched = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** b)
    pieces = {
        "attention block (qkv, norm, rope, kv write, attention, o_proj)":
            (jax.jit(attention), (state, h, cache, cache), 2 * cfg.hidden_size * 2 * (cfg.q_size + cfg.kv_size) + kv_bytes),
        "paged attention core": (jax.jit(attention_core), (q, cache, cache), kv_bytes),
        "MoE block (router, sort, 2 grouped GEMMs, combine)":
            (jax.jit(moe), (state, h), touched * 3 * cfg.hidden_size * cfg.intermediate_size * 2),
        "rms norm": (jax.jit(lambda h, w: rms_norm(h, w, 1e-6)), (h, state["attn_norm"][...]), 2 * h.nbytes),
    }
    for name, (fn, fn_args, floor_bytes) in pieces.items():
        t = median_time(fn, *fn_args, iters=args.iters)
        record("breakdown", f"{name}, {b} tok ctx {ctx}", t * 1e6, "us",
               f"floor {floor_bytes / bw * 1e6:.0f} us ({floor_bytes / bw / t:.0%})")


# -- engine ------------------------------------------------------------------------------------

def kv_cache_flags(args) -> dict:
    """The KV cache of benchmark engines: sized from device memory on GPUs, 4096 tokens per rank
    on the CPU (which reports no memory statistics)."""
    return dict(kv_cache_dtype=args.kv_cache_dtype, mem_fraction_static=args.mem_fraction_static,
                max_total_tokens=None if jax.default_backend() == "gpu" else 4096)


def make_bench_engine(args):
    from minimax_jax.engine.engine import Engine
    n = len(jax.devices())
    flags = dict(tp_size=n, ep_size=args.ep_size or n)
    if args.engine_layout == "dep":
        flags.update(dp_size=n, enable_dp_attention=True)
    return Engine(model_path=args.preset, load_format="dummy", dtype="bfloat16", quantization=args.quantization,
                  page_size=args.page_size, context_length=args.prompt + args.output + 16,
                  max_running_requests=args.max_running_requests or args.requests,
                  chunked_prefill_size=args.chunk, max_prefill_tokens=args.max_prefill_tokens,
                  attention_backend=args.attention_backend, moe_dispatch_fp4=args.moe_dispatch_fp4,
                  moe_dispatch_fp8=args.moe_dispatch_fp8, enable_ar_fusion=args.enable_ar_fusion,
                  moe_combine=args.moe_combine, decode_attention_backend=args.decode_attention_backend,
                  moe_kernel=args.moe_kernel, cuda_graph_max_bs=args.cuda_graph_max_bs,
                  disable_radix_cache=args.disable_radix_cache, **kv_cache_flags(args),
                  json_model_override_args=json.dumps({"num_hidden_layers": args.engine_layers}), **flags)


def workload_prompts(args, vocab: int) -> list[list[int]]:
    """Random token ids, each prompt's first --shared-prefix of them the same."""
    rng = np.random.RandomState(0)
    prefix = rng.randint(0, vocab, args.shared_prefix).tolist()
    return [prefix + rng.randint(0, vocab, args.prompt - len(prefix)).tolist() for _ in range(args.requests)]


def concurrency(args) -> int:
    return min(args.max_running_requests or args.requests, args.requests)


def warm_prefill_rows(engine, warmed_prompts: int, prompts: list[list[int]], params: dict) -> None:
    """Compiles the row buckets of the measured prompts' prefill steps that the warm-up ran no
    step of: its full steps and its last one (1209 prompts in steps of 8 rows end in a step of
    one on TP, which compiled inside the measured wall: docs/benchmarks.md, run FN). A full
    step's rows are the warm-up's largest where the warm-up had more prompts a rank than that
    (the scheduler capped it), else unknown: then the measured count a rank stands for it."""
    from minimax_jax.engine.scheduler import bucket
    ranks = len(engine.schedulers)
    warmed = {s["shape"][0] // ranks for s in engine.step_times if s["kind"] == "prefill"}
    if not warmed:
        return
    per_rank = -(-len(prompts) // ranks)
    capped = -(-warmed_prompts // ranks) > max(warmed)
    full = min(per_rank, max(warmed)) if capped else per_rank
    for rows in sorted({full, per_rank % full} - {0}):
        if bucket(rows, engine.batch_buckets) not in warmed:
            engine.flush_cache()        # else they start on the warm-up's cached pages: another shape
            engine.generate(input_ids=prompts[:rows * ranks], sampling_params=params)
            warmed.add(bucket(rows, engine.batch_buckets))


def bench_engine(args) -> None:
    """The workload through Engine: at most --max-running-requests in flight (a finished
    request lets the next in, as a client at that concurrency would); TTFT counts from each
    request's submission. The decode step is printed beside its floor: this device's weights
    and the KV entries the step reads, over the copy bandwidth measured here first."""
    if args.url:
        return bench_url(args)
    n = len(jax.devices())
    bandwidth = copy_bandwidth(*copy_case(args.copy_elems))
    engine = make_bench_engine(args)
    params = {"max_new_tokens": args.output, "temperature": 0.0, "ignore_eos": True}
    prompts = workload_prompts(args, engine.cfg.vocab_size)
    warm = prompts[:args.warmup_requests] if args.warmup_requests else prompts
    warm_params = dict(params, max_new_tokens=args.warmup_output or args.output)
    score = dict(logprob_start_len=args.logprob_start_len)
    # the same shapes compile their buckets (the scoring steps theirs)
    engine.generate(input_ids=warm, sampling_params=warm_params, return_logprob=args.logprob_start_len >= 0, **score)
    warm_prefill_rows(engine, len(warm), prompts, warm_params)
    engine.flush_cache()        # the measured prompts are the warm-up's: none may start on its pages
    # the decode batch of the full concurrency compiles here, at every page-table width its
    # contexts reach, not inside the measured wall (run BG's wall held one such compile, about 3 s)
    engine.compile_decode(min(concurrency(args), len(prompts)),
                          range(args.prompt + 1, args.prompt + args.output + 1), params)
    kv_tokens = engine.schedulers[0].allocator.num_pages * engine.args.page_size
    record("engine", "KV capacity per dp rank", kv_tokens, "tokens",
           f"{engine.args.kv_cache_dtype} cache, {len(engine.schedulers)} ranks, "
           f"at most {kv_tokens // (args.prompt + args.output)} requests of {args.prompt + args.output} per rank")
    compiles = engine.num_compiles
    engine.step_times.clear()
    floors: list[tuple[float, tuple]] = []
    decode_shapes: dict[tuple, tuple] = {}
    engine.on_step.append(decode_floor_hook(engine, bandwidth, floors, decode_shapes))
    reqs = [engine.make_request(input_ids=p, sampling_params=params, **score) for p in prompts]
    submitted, first, last = {}, {}, {}
    waiting = list(reversed(reqs))
    start = time.perf_counter()

    def submit(count: int) -> None:
        for _ in range(min(count, len(waiting))):
            req = waiting.pop()
            submitted[req.rid] = time.perf_counter()
            engine.submit(req)

    submit(concurrency(args))
    while engine.has_work():
        for req in engine.step():
            now = time.perf_counter()
            first.setdefault(req.rid, now)
            last[req.rid] = now
            if req.finished:
                submit(1)
    wall = time.perf_counter() - start
    dispatch = {True: " fp4-dispatch", False: " bf16-dispatch", None: ""}[args.moe_dispatch_fp4]
    dispatch += "" if args.moe_dispatch_fp8 else " no-fp8-dispatch"
    dispatch += "" if args.enable_ar_fusion else " no-ar-fusion"
    dispatch += " combine=all-reduce" if args.moe_combine == "all_reduce" else ""
    moe_tp = " moe-tp" if args.ep_size == 1 else ""
    graphs = f" cuda-graph-max-bs={args.cuda_graph_max_bs}" if args.cuda_graph_max_bs else ""
    graphs += " no-radix-cache" if args.disable_radix_cache else ""
    graphs += f" prompt-logprobs-from={args.logprob_start_len}" if args.logprob_start_len >= 0 else ""
    tag = (f"{args.engine_layout.upper()}{n}{moe_tp} {args.engine_layers}L {workload_name(args)} "
           f"attn={args.attention_backend} moe={args.moe_kernel}{dispatch}{graphs}")
    record_latencies(tag, wall, [(submitted[r.rid], first[r.rid], last[r.rid], len(r.output_ids)) for r in reqs],
                     f"{compiles} compiles in warm-up, {engine.num_compiles - compiles} while measured")
    if args.shared_prefix:
        cached, total = sum(r.cached_tokens for r in reqs), sum(len(p) for p in prompts)
        record("engine", f"{tag} prompt tokens from the prefix cache", cached / total, "fraction",
               f"{cached} of {total} prompt tokens")
    if args.logprob_start_len >= 0:
        scored = sum(x is not None for r in reqs for x in r.input_logprobs)
        record("engine", f"{tag} prompt tokens scored", scored, "tokens",
               f"of {sum(len(p) for p in prompts)} prompt tokens; every prompt from position {args.logprob_start_len}")
    times = list(engine.step_times)
    for kind in ("prefill", "decode"):
        steps = [s for s in times if s["kind"] == kind]
        if steps:
            mean = lambda field: np.mean([s[field] for s in steps]) * 1e3
            record("engine", f"{tag} {kind} step, launch to result", mean("device"), "ms",
                   f"plan {mean('plan'):.1f}, launch {mean('launch'):.1f}, wait {mean('wait'):.1f}, "
                   f"post {mean('post'):.1f} ms; {len(steps)} steps, shapes {sorted({s['shape'] for s in steps})[:4]}")
    # a step's launch to result also spans the step queued ahead of it (the engine launches the
    # next step before reading this one), and a prefill's launch returns only once the device
    # reaches its last row-bucket switch (XLA's GPU runtime reads a conditional's branch index on
    # the host): decode is timed from one decode step's result to the next's, the device's time
    # per step while decode keeps it busy
    decode = [after["done"] - s["done"] for s, after in zip(times, times[1:]) if s["kind"] == after["kind"] == "decode"]
    if decode:
        record("engine", f"{tag} decode step, result to result", np.median(decode) * 1e3, "ms",
               f"median of {len(decode)}; mean {np.mean(decode) * 1e3:.1f} ms")
    if floors and decode:
        bytes_floor = float(np.mean([seconds for seconds, _ in floors]))
        record("engine", f"{tag} decode step floor, bytes", bytes_floor * 1e3, "ms",
               f"measured {np.median(decode) / bytes_floor:.2f}x (decode result to result); weights (experts: the "
               f"share the step's tokens touch) + KV read per device over {bandwidth / 1e12:.2f} TB/s")
        by_shape = {shape: decode_collectives_time(args, engine, *first) for shape, first in decode_shapes.items()}
        collectives = float(np.mean([by_shape[shape] for _, shape in floors]))
        record("engine", f"{tag} decode step collectives, replayed alone", collectives * 1e3, "ms",
               f"the model step's collectives in its shapes and nothing else (sharding.replay), device time per "
               f"device; {len(by_shape)} decode shapes")
        floor = bytes_floor + collectives
        record("engine", f"{tag} decode step floor", floor * 1e3, "ms",
               f"measured {np.median(decode) / floor:.2f}x (decode result to result); the bytes' floor + the collectives")


def workload_name(args) -> str:
    c = concurrency(args)
    name = f"{args.workload} " if args.workload else ""
    prefix = f" ({args.shared_prefix} shared)" if args.shared_prefix else ""
    return f"{name}{args.requests}x{args.prompt}{prefix}/{args.output}" + (f" at {c} in flight" if c < args.requests else "")


def record_latencies(tag: str, wall: float, times: list[tuple[float, float, float, int]], note: str) -> None:
    """times: (submitted, first token, last token, output tokens) of each request."""
    out_tokens = sum(t[3] for t in times)
    ttft = np.array([f - s for s, f, _, _ in times])
    tpot = np.array([(l - f) / max(k - 1, 1) for _, f, l, k in times])
    record("engine", f"{tag} output throughput", out_tokens / wall, "tok/s",
           f"wall {wall:.1f} s, {out_tokens} tokens; {note}")
    record("engine", f"{tag} TTFT p50/p99", np.percentile(ttft, 50), "s", f"p99 {np.percentile(ttft, 99):.2f} s")
    record("engine", f"{tag} TPOT p50/p99", np.percentile(tpot, 50) * 1e3, "ms", f"p99 {np.percentile(tpot, 99) * 1e3:.1f} ms")


def copy_case(elems: int) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """The copy the ceilings time: a jitted copy of elems bf16 values (read once, written once;
    XLA runs it as a device-to-device memcpy on GPUs) and its input, on the first device."""
    return jax.jit(jnp.copy), jax.random.normal(jax.random.PRNGKey(0), (elems,), jnp.bfloat16)


def copy_bandwidth(copy: Callable[[jax.Array], jax.Array], x: jax.Array, chain: int = 20, repeats: int = 3) -> float:
    """Read + write bytes per second of `copy_case`'s copy: `chain` copies, each of the one
    before, dispatched back to back with one wait at the end (the median of `repeats` chains),
    so the device streams them without waiting for the host. Each copy timed alone from the
    host with a wait per copy read 3.26-3.39 TB/s on an H200 where its kernel took 4.26 TB/s
    on the device timeline and 20 copies in flight 4.20-4.22 (docs/benchmarks.md, run CX; a
    chain 4.17 in run CY): the dispatch before each copy left the device idle, and every floor
    divided by that figure until then."""
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = x
        for _ in range(chain):
            y = copy(y)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - start) / chain)
    return 2 * x.nbytes / float(np.median(times))


def decode_floor_hook(engine, bandwidth: float, floors: list, shapes: dict):
    """An Engine.on_step hook appending each decode step's floor and shape: the bytes one device
    reads, over bandwidth. They are its weights (the embedding table only gathers rows), of its
    routed experts only the share that the step's tokens are expected to touch (each of N tokens
    picks k of E experts: a given expert goes unpicked with probability (1 - k/E)^N, so one
    token reads 8 of 256 experts and W1's 1212 all of them), and the KV entries of its fullest
    rank. `shapes` keeps the first step of each shape, whose collectives are timed afterwards
    (`decode_collectives_time`), not inside the measured wall."""
    leaves = jax.tree_util.tree_flatten_with_path(engine.runner.state)[0]
    local = {path: a.addressable_shards[0].data.nbytes for path, a in leaves
             if hasattr(a, "addressable_shards") and "embed" not in jax.tree_util.keystr(path)}
    experts = sum(n for path, n in local.items() if "experts" in jax.tree_util.keystr(path))
    others = sum(local.values()) - experts
    cfg = engine.cfg
    unpicked = 1 - cfg.num_experts_per_tok / cfg.num_experts
    k_local = engine.runner.kv[0].addressable_shards[0].data
    layers, _, _, heads, head_dim = k_local.shape
    kv_per_token = 2 * layers * heads * head_dim * k_local.dtype.itemsize
    dp = engine.layout.dp

    def hook(scheduled, seconds: float) -> None:
        if scheduled.step.tokens.shape[1] != 1:
            return
        valid = np.asarray(scheduled.step.valid)
        context = np.where(valid, scheduled.step.positions + 1, 0).reshape(dp, -1).sum(axis=1)
        touched = 1 - unpicked ** int(valid.sum())
        shape = scheduled.step.tokens.shape     # the collectives' shapes; the page table's width changes none
        shapes.setdefault(shape, (scheduled.step, scheduled.logit_index))
        floors.append(((others + experts * touched + int(context.max()) * kv_per_token) / bandwidth, shape))
    return hook


def decode_collectives_time(args, engine, step, logit_index) -> float:
    """Seconds a device spends in one decode step's collectives replayed alone (sharding.replay):
    on GPUs the device time per device from a trace, elsewhere the wall time of a call."""
    from sharding.replay import collectives_only, step_collectives
    runner = engine.runner
    mesh, collectives = step_collectives(runner.forward, runner.state, runner.kv, step, jnp.asarray(logit_index))
    for c in sorted(collectives, key=lambda c: -c.count * c.operand_bytes)[:6]:
        print(f"[engine] decode step of {step.tokens.shape[0]} slots: {c.describe()}", flush=True)
    program, inputs = collectives_only(mesh, collectives)
    if jax.default_backend() != "gpu":
        return median_time(program, *inputs)
    trace = device_time(program, *inputs, trace_dir=Path(args.out) / "collectives-trace", iters=5)
    return sum(trace.device.values()) / len(trace.devices) * 1e-6


def bench_url(args) -> None:
    """The workload against a running server (scripts/serve.py, or any OpenAI-compatible one that
    takes token-id prompts and `ignore_eos`) through the openai client: streamed completions of
    random token ids, at most --max-running-requests in flight; TTFT counts from each request's
    send to its first streamed token. The API key comes from OPENAI_API_KEY."""
    import asyncio
    import httpx
    import openai
    from minimax_jax.config import PRESETS
    vocab = PRESETS[args.preset].vocab_size if args.preset in PRESETS else args.url_vocab
    prompts = workload_prompts(args, vocab)
    client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", max_retries=0, timeout=3600,
                                api_key=os.environ.get("OPENAI_API_KEY", "none"))

    # --logprob-start-len 0: each prompt scored as lm-evaluation-harness asks (echo + logprobs)
    scoring = dict(echo=True, logprobs=1) if args.logprob_start_len == 0 else {}
    scored = []

    async def one(model: str, prompt: list[int], output: int, gate: asyncio.Semaphore):
        async with gate:
            sent, first, last, tokens = time.perf_counter(), None, None, 0
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=output, temperature=0.0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True}, **scoring)
            async for chunk in stream:
                new = sum(len((c.model_extra or {}).get("token_ids") or []) for c in chunk.choices)
                if scoring and first is None:     # the first chunk echoes the prompt with its logprobs
                    echoed = [c.logprobs.token_logprobs[:len(prompt)] for c in chunk.choices if c.logprobs]
                    scored.append(sum(lp is not None for lps in echoed for lp in lps))
                if new:
                    now = time.perf_counter()
                    first, last, tokens = first or now, now, tokens + new
            return sent, first or sent, last or sent, tokens

    async def run(model: str, batch: list[list[int]], output: int):
        gate = asyncio.Semaphore(concurrency(args))
        return await asyncio.gather(*[one(model, p, output, gate) for p in batch])

    async def main():
        model = (await client.models.list()).data[0].id
        warm = prompts[:args.warmup_requests or concurrency(args)]
        await run(model, warm, args.warmup_output or args.output)     # the server compiles its buckets
        # the measured prompts are the warm-up's: empty the server's prefix cache first, as sglang's
        # bench_serving does (a server without the endpoint answers 404)
        async with httpx.AsyncClient(timeout=60) as http:
            flushed = await http.post(args.url.rstrip("/") + "/flush_cache",
                                      headers={"Authorization": f"Bearer {client.api_key}"})
        if flushed.status_code != 200:
            print(f"[url] POST /flush_cache answered {flushed.status_code}: the measured prompts may find the "
                  f"warm-up's in the server's prefix cache", flush=True)
        scored.clear()
        start = time.perf_counter()
        times = await run(model, prompts, args.output)
        return model, time.perf_counter() - start, times

    model, wall, times = asyncio.run(main())
    tag = f"{args.url} {model} {workload_name(args)}" + (" prompt-logprobs" if scoring else "")
    record_latencies(tag, wall, list(times), "streamed over HTTP")
    if scoring:
        record("engine", f"{tag} prompt tokens scored", sum(scored), "tokens",
               f"of {sum(len(p) for p in prompts)} prompt tokens, echoed with their logprobs")


@dataclasses.dataclass
class Trace:
    device: dict[str, float]       # microseconds per kernel name, summed over the traced devices
    host: dict[str, float]         # microseconds per host event name, summed over host threads
    kernels: int                   # kernels launched on the devices
    devices: set
    # microseconds each device sat with nothing running on any stream, summed over the devices
    # and filed under the kernel that ended the wait (what the device was waiting to be given)
    idle_before: dict[str, float] = dataclasses.field(default_factory=dict)


def read_trace(trace_dir: Path) -> Trace:
    """Sums the newest perfetto trace under trace_dir by event name, devices apart from host."""
    import gzip
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.open(files[-1]).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    # without a GPU in the trace (the CPU smoke run) every process counts as a device
    devices = {pid for pid, name in processes.items() if "GPU" in name or "gpu" in name} or set(processes)
    trace = Trace({}, {}, 0, devices)
    timelines: dict = {pid: [] for pid in devices}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            totals = trace.device if e.get("pid") in devices else trace.host
            totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"]
            if e.get("pid") in devices:
                trace.kernels += 1
                timelines[e["pid"]].append((float(e["ts"]), float(e["dur"]), e["name"]))
    for timeline in timelines.values():
        busy_until = None
        for start, dur, name in sorted(timeline):
            if busy_until is not None and start > busy_until:
                trace.idle_before[name] = trace.idle_before.get(name, 0.0) + start - busy_until
            busy_until = max(busy_until or start, start + dur)
    return trace


def device_time(fn, *args, trace_dir: Path, iters: int = 10) -> Trace:
    """fn(*args) run iters times inside a profiler trace (after a warm-up): the device time of
    each kernel per call, free of the host's dispatch that a wall-clock timing of one call
    includes."""
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
    trace = read_trace(trace_dir)
    trace.device = {name: us / iters for name, us in trace.device.items()}
    return trace


# the XLA computation each kernel's numbers are checked against in the moe section
MOE_REFERENCE = {"mosaic-ws-w8a8": "xla-w8a8", "xla-w8a8": "xla", "mosaic": "xla", "mosaic-ws": "xla",
                 "mosaic-fp8": "xla", "mosaic-w8a8": "xla"}
MOE_CHECK_MAX_TOKENS = 8192     # the XLA references at prefill sizes take minutes on a GPU


def bench_moe(args, ceilings: dict) -> None:
    """The routed-experts block of one layer alone on one device, as one rank of expert
    parallelism sees it: --moe-tokens tokens (all ranks' tokens, as DEP gathers them) routed to
    8 of the preset's experts each, of which --local-experts live here (ids outside contribute
    nothing). Device time per call from a profiler trace, its largest kernels, and the floor:
    the local experts' FP8 bytes over the copy bandwidth. Up to MOE_CHECK_MAX_TOKENS each
    kernel's output is checked against its XLA reference on the same inputs (MOE_REFERENCE: the
    W8A8 kernel against the XLA form of its own rounding, "xla-w8a8" against "xla" to show what
    that rounding moves)."""
    from flax import nnx
    from minimax_jax.config import preset
    from minimax_jax.model import Experts
    cfg = preset(args.preset)
    if args.smoke:      # the FP8 kernels' 128-wide blocks
        cfg = dataclasses.replace(cfg, hidden_size=128, intermediate_size=128)
    local_cfg = dataclasses.replace(cfg, num_experts=args.local_experts)
    experts = Experts(local_cfg, jnp.bfloat16, nnx.Rngs(0), expert_format="fp8")
    experts.num_experts = cfg.num_experts       # this rank's share of all experts sizes its row buckets
    floor_bytes = args.local_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    variants = [(kernel, kernel == "mosaic-ws-w8a8") for kernel in args.moe_kernels]
    if args.moe_unfused_swiglu:
        variants.append(("mosaic-ws-w8a8", False))
    graphdef, state = nnx.split(experts)

    def block(kernel: str, fused: bool):
        def run(state, x, ids, w):
            module = nnx.merge(graphdef, state)
            module.kernel, module.fuse_swiglu = kernel, fused
            return module(x, ids, w, first_expert=0)
        return jax.jit(run)

    references: dict = {}
    for kernel, fused in variants:
        name = kernel + (" fused-swiglu" if fused else " unfused-swiglu" if kernel == "mosaic-ws-w8a8" else "")
        timed = block(kernel, fused)
        for tokens in args.moe_tokens:
            rng = np.random.RandomState(tokens)
            ids = jnp.asarray(np.argsort(rng.random((tokens, cfg.num_experts)), axis=1)[:, :cfg.num_experts_per_tok],
                              jnp.int32)
            x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, cfg.hidden_size), jnp.bfloat16)
            w = jnp.asarray(rng.random((tokens, cfg.num_experts_per_tok)), jnp.float32)
            trace = device_time(timed, state, x, ids, w, iters=args.iters,
                                trace_dir=Path(args.out) / f"trace-moe-{name.replace(' ', '-')}-{tokens}")
            total = sum(trace.device.values())
            floor = floor_bytes / ceilings["bandwidth"] * 1e6
            record("moe", f"{name} {tokens} tok, {args.local_experts} local experts", total, "us/call",
                   f"device time; floor {floor:.0f} us ({floor / total:.0%}); "
                   f"{trace.kernels / args.iters:.0f} kernels/call")
            for kname, us in sorted(trace.device.items(), key=lambda kv: -kv[1])[:8]:
                record("moe", f"  {name} {tokens} tok: {kname[:70]}", us, "us/call")
            reference = MOE_REFERENCE.get(kernel)
            if reference and tokens <= MOE_CHECK_MAX_TOKENS:
                if (reference, tokens) not in references:
                    references[reference, tokens] = np.asarray(block(reference, False)(state, x, ids, w), np.float32)
                want, got = references[reference, tokens], np.asarray(timed(state, x, ids, w), np.float32)
                scale = np.abs(want).max()
                row_err = np.abs(got - want).max(axis=1)
                record("moe", f"{name} {tokens} tok vs {reference}", float(row_err.max() / scale), "x max|ref|",
                       f"max error; {int((row_err > 1e-2 * scale).sum())} of {tokens} rows off by over 1e-2, "
                       f"mean row error {float(row_err.mean() / scale):.1e}")


def bench_profile(args) -> None:
    """A perfetto trace of a few prefill or decode steps of the engine workload, and the device
    time per kernel name summed over them (largest first)."""
    engine = make_bench_engine(args)
    prompts = workload_prompts(args, engine.cfg.vocab_size)
    params = {"max_new_tokens": args.output, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=params)        # compiles every bucket traced below
    engine.flush_cache()                                              # the same prompts follow
    for p in prompts:
        engine.submit(engine.make_request(input_ids=p, sampling_params=params))
    if args.profile_phase == "decode":
        while any(not r.prefilled for s in engine.schedulers for r in s.running + list(s.waiting)):
            engine.step()
        for _ in range(3):
            engine.step()
    trace_dir = Path(args.out) / "trace"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(args.profile_steps):
            engine.step()
        jax.block_until_ready(engine.runner.kv)
        wall = time.perf_counter() - start
    engine.run_until_done()
    trace = read_trace(trace_dir)
    devices, totals, host = len(trace.devices), trace.device, trace.host
    busy = sum(totals.values()) / args.profile_steps / devices
    record("profile", f"{args.profile_phase}: every kernel", busy, "us/step/device",
           f"wall {wall / args.profile_steps * 1e6:.0f} us/step (traced); below the wall: idle or host-bound; "
           f"kernels on concurrent streams (NCCL) add up; {trace.kernels / args.profile_steps / devices:.0f} "
           "kernels/step/device")
    for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:40]:
        record("profile", f"{args.profile_phase}: {name[:80]}", dur / args.profile_steps / devices,
               "us/step/device", f"mean over {devices} traced devices")
    idle = sum(trace.idle_before.values()) / args.profile_steps / devices
    record("profile", f"{args.profile_phase}: idle, every stream", idle, "us/step/device",
           "gaps with no kernel on any stream, within the traced steps and between them; the first "
           "step's include the trace's own start (at 256 decode slots on an H200 all of it: "
           "docs/benchmarks.md, run DG)")
    for name, dur in sorted(trace.idle_before.items(), key=lambda kv: -kv[1])[:12]:
        record("profile", f"{args.profile_phase} idle before: {name[:80]}", dur / args.profile_steps / devices,
               "us/step/device", "the device waited with nothing to run until this kernel began")
    # where the host threads spend the steps (a launch that waits on the device shows here)
    for name, dur in sorted(host.items(), key=lambda kv: -kv[1])[:12]:
        record("profile", f"{args.profile_phase} host: {name[:80]}", dur / args.profile_steps, "us/step",
               "summed over host threads")


# -- hf baseline -------------------------------------------------------------------------------

def bench_hf(args) -> None:
    """transformers and this engine, same depth, same batch, one device each."""
    import torch
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM
    from minimax_jax.config import preset
    from minimax_jax.engine.engine import Engine
    layers, batch, prompt, new = args.engine_layers, args.hf_batch, args.prompt, args.hf_new
    cfg = MiniMaxM2Config(**{**preset(args.preset).to_hf(), "num_hidden_layers": layers})
    with torch.device("cuda"):
        torch.manual_seed(0)
        hf = MiniMaxM2ForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (batch, prompt), device="cuda")
    with torch.no_grad():
        hf.generate(ids[:, :16], max_new_tokens=2, do_sample=False)         # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        hf_time = time.perf_counter() - start
    record("hf", f"transformers {layers}L batch {batch} {prompt}+{new}", batch * new / hf_time, "out tok/s",
           f"{hf_time:.2f} s incl. prefill")
    del hf
    torch.cuda.empty_cache()
    engine = Engine(model_path=args.preset, load_format="dummy", dtype="bfloat16", page_size=args.page_size,
                    context_length=prompt + new + 16, max_running_requests=batch, chunked_prefill_size=args.chunk,
                    max_prefill_tokens=args.max_prefill_tokens, max_total_tokens=batch * (prompt + new + 16),
                    json_model_override_args=json.dumps({"num_hidden_layers": layers}),
                    disable_radix_cache=True)   # transformers caches no prefix: the timed run computes every prompt
    prompts = ids.cpu().numpy().tolist()
    params = {"max_new_tokens": new, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=params)                # compiles the buckets
    start = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=params)
    ours = time.perf_counter() - start
    record("hf", f"minimax-jax {layers}L batch {batch} {prompt}+{new}", batch * new / ours, "out tok/s",
           f"{ours:.2f} s incl. prefill; {hf_time / ours:.2f}x transformers")


# -- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    from minimax_jax.engine.engine import KV_CACHE_DTYPES
    from minimax_jax.ops.attention import BACKENDS as ATTENTION_BACKENDS, DECODE_BACKENDS
    from minimax_jax.ops.moe import KERNELS as MOE_KERNELS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="env,check,kernels,layers", help="comma separated (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on 8 simulated CPU devices: checks the script")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for the JSON log")
    p.add_argument("--preset", default="minimax-m2.5", help="model shapes (default: %(default)s)")
    p.add_argument("--quantization", choices=["fp8", "modelopt_fp4"], default=None, help="expert format")
    p.add_argument("--depths", type=int, nargs=2, default=[2, 6], help="layer counts for the layer section")
    p.add_argument("--decode-tokens", type=int, default=256, help="decode batch over all devices")
    p.add_argument("--context", type=int, default=1024, help="KV length of each decode slot")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kernel-rows", type=int, nargs="+", default=[512, 2048, 32768])
    p.add_argument("--local-experts", type=int, default=64)
    p.add_argument("--check-kernels", default="",
                   help="check-long: only these MoE kernels (comma separated, e.g. xla,mosaic-ws; default: all)")
    p.add_argument("--moe-tokens", type=int, nargs="+", default=[256, 1212],
                   help="moe section: tokens of a step over all ranks (decode: W2 4 x 64, W1 4 x 303; "
                   "prefill: 4 x 8192)")
    p.add_argument("--moe-kernels", nargs="+", choices=MOE_KERNELS[1:], default=["mosaic-fp8", "mosaic-ws-w8a8"],
                   help="moe section: the expert GEMMs to time")
    p.add_argument("--moe-unfused-swiglu", action="store_true",
                   help="moe section: also time mosaic-ws-w8a8 with SwiGLU and its rounding as XLA passes "
                   "(by default they run in the gate/up kernel's epilogue)")
    p.add_argument("--tune", action="store_true", help="time several Mosaic block configurations")
    p.add_argument("--fp8-fused", action="store_true", help="kernels: also variants of the FP8 kernels "
                   "(tile rows, pipeline depth, double-buffered, warp-specialised, W8A8), the down projection's "
                   "shape, and the default kernel's fixed costs")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--copy-elems", type=int, default=1 << 30)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--workload", choices=list(WORKLOADS),
                   help="engine section: " + "; ".join(f"{k}: {v['what']}" for k, v in WORKLOADS.items())
                   + " (flags given beside it win)")
    p.add_argument("--url", help="engine section: send the workload to the server at this address "
                   "(e.g. http://127.0.0.1:30000) through the OpenAI API instead of building an engine")
    p.add_argument("--url-vocab", type=int, default=200064,
                   help="--url: prompt token ids are drawn below this when --preset names no preset")
    p.add_argument("--engine-layout", choices=["dep", "tp"], help="default: dep, or the workload's")
    p.add_argument("--engine-layers", type=int, default=4)
    p.add_argument("--requests", type=int, help="default: 256, or the workload's")
    p.add_argument("--prompt", type=int, help="prompt tokens of each request (default: 900, or the workload's)")
    p.add_argument("--output", type=int, help="output tokens of each request (default: 100, or the workload's)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--max-running-requests", type=int,
                   help="requests in flight, the engine's limit (default: all, or the workload's)")
    p.add_argument("--warmup-requests", type=int, help="requests of the warm-up run (default: all); the decode "
                   "steps of the full concurrency are compiled beside it (Engine.compile_decode), and prefill "
                   "steps of the row counts the measured prompts end in that it did not run")
    p.add_argument("--warmup-output", type=int, help="output tokens per warm-up request (default: --output)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    p.add_argument("--ep-size", type=int, choices=(1,), default=None,
                   help="engine and profile sections: 1 splits every expert over the devices (MoE-TP); "
                        "default: experts over all devices (EP)")
    p.add_argument("--moe-kernel", choices=MOE_KERNELS, default="auto", help="engine and profile sections")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--decode-attention-backend", default="auto", choices=DECODE_BACKENDS)
    p.add_argument("--cuda-graph-max-bs", type=int, default=0,
                   help="engine and profile sections: decode steps of at most this many slots per dp rank run as "
                   "command buffers of every thunk kind (serve.py's flag)")
    p.add_argument("--moe-dispatch-fp4", action=argparse.BooleanOptionalAction, default=None,
                   help="engine: NVFP4 all-gather of the DEP dispatch (default: on with NVFP4 experts)")
    p.add_argument("--moe-dispatch-fp8", action=argparse.BooleanOptionalAction, default=True,
                   help="engine and profile: W8A8 experts get their tokens all-gathered as FP8 codes")
    p.add_argument("--enable-ar-fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="engine and profile: on tp > 1, steps whose tokens divide over tp keep the residual "
                   "scattered (reduce-scatter + add + RMSNorm + all-gather); off: one all-reduce (serve.py's "
                   "--enable-flashinfer-allreduce-fusion)")
    p.add_argument("--moe-combine", choices=("reduce_scatter", "all_reduce"), default="reduce_scatter",
                   help="engine and profile: how the experts' partial outputs are summed over the devices "
                   "(serve.py's flag)")
    p.add_argument("--mem-fraction-static", type=float, default=0.85,
                   help="weights + KV share of device memory; the KV cache takes what fits")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="engine, profile and --url: the first N prompt tokens are the same in every request, as a system "
                   "prompt is, for the prefix cache (default: 0, every token random)")
    p.add_argument("--disable-radix-cache", action="store_true",
                   help="engine and profile: no prefix caching (serve.py's flag)")
    p.add_argument("--logprob-start-len", type=int, default=-1,
                   help="engine: every request also scores its prompt's tokens from this position on (sglang's "
                   "logprob_start_len; what /v1/completions with echo and logprobs asks; with --url only 0, sent "
                   "as echo + logprobs), default -1: none")
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--xla-flag-sets", nargs="+", choices=list(XLA_FLAG_SETS),
                   help="run the sections once per named XLA flag set, each in its own process")
    p.add_argument("--profile-phase", choices=("prefill", "decode"), default="decode",
                   help="profile: trace the first steps after submission (prefill) or steps once all are prefilled")
    p.add_argument("--hf-new", type=int, default=32)
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}
    if args.smoke:
        args.preset, args.depths, args.decode_tokens, args.context = "tiny", [1, 2], 16, 32
        args.kernel_rows, args.local_experts, args.hidden, args.intermediate = [64], 4, 64, 32
        args.copy_elems, args.matmul_n, args.iters, args.page_size = 1 << 16, 128, 2, 8
        args.engine_layers, args.chunk, args.max_prefill_tokens = 2, 32, 256
        args.moe_tokens, args.moe_kernels, args.moe_unfused_swiglu = [16], ["xla", "xla-w8a8"], False
        for k, v in dict(requests=16, prompt=24, output=8).items():
            if k not in given:
                setattr(args, k, v)
                given.add(k)
    preset = WORKLOADS[args.workload] if args.workload else {}
    for k, v in {**ENGINE_DEFAULTS, **{k: v for k, v in preset.items() if k != "what"}}.items():
        if k not in given:
            setattr(args, k, v)
    if args.url and args.logprob_start_len > 0:
        p.error("--url scores whole prompts (echo with logprobs): give --logprob-start-len 0")
    if not 0 <= args.shared_prefix < args.prompt:
        p.error(f"--shared-prefix must be in [0, --prompt), got {args.shared_prefix} with --prompt {args.prompt}")
    return args


def run_flag_sets(args, argv: list[str]) -> tuple[str, int]:
    """The same sections once per XLA flag set, each in a child process (a flag this XLA does not
    know, or a crash, ends only that child); their rows are recorded here under the set's name.
    This process never touches the devices (the children need all their memory). Returns the
    children's device kind and count."""
    device = ("unknown", 0)
    import subprocess
    rest, skip = [], False
    for a in argv:       # drop --xla-flag-sets and its values, and --out
        if skip and not a.startswith("--"):
            continue
        skip = a in ("--xla-flag-sets", "--out")
        if not skip and not a.startswith("--xla-flag-sets=") and not a.startswith("--out="):
            rest.append(a)
    for name in args.xla_flag_sets:
        out = Path(args.out) / f"xla-{name}"
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAG_SETS[name]}".strip())
        print(f"== XLA flag set {name}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest, "--out", str(out)], env=env)
        log = out / "bench.json"
        if proc.returncode != 0 or not log.exists():
            record("xla-flags", f"{name}", float(proc.returncode), "exit status", "the run failed; see its log above")
            continue
        child = json.loads(log.read_text())
        device = (child["device"], child["devices"])
        for row in child["rows"]:
            record(row["section"], f"[{name}] {row['variant']}", row["value"], row["unit"], row["note"])
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.xla_flag_sets:
        return write_summary(args, *run_flag_sets(args, list(sys.argv[1:] if argv is None else argv)))
    if args.smoke:
        jax.config.update("jax_num_cpu_devices", 8)
    sections = args.sections.split(",")
    if "profile" in sections:
        bench_profile(args)
    if "hf" in sections:            # torch shares the GPU: JAX takes memory as it goes
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        bench_hf(args)
    ceilings = bench_env(args) if {"env", "kernels", "moe", "layers", "breakdown"} & set(sections) else {}
    if "check" in sections:
        bench_check(args)
    if "check-long" in sections:
        bench_check_long(args)
    if "kernels" in sections:
        bench_kernels(args, ceilings)
    if "moe" in sections:
        bench_moe(args, ceilings)
    if "attention" in sections:
        bench_attention(args)
    if "layouts" in sections:
        bench_layouts(args)
    if "layers" in sections:
        bench_layers(args, ceilings)
    if "breakdown" in sections:
        bench_breakdown(args, ceilings)
    if "engine" in sections:
        bench_engine(args)
    return write_summary(args)


def write_summary(args, device: str | None = None, count: int | None = None) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device is None:
        device, count = jax.devices()[0].device_kind, len(jax.devices())
    (out / "bench.json").write_text(json.dumps({"argv": sys.argv, "device": device, "devices": count,
                                                "rows": ROWS}, indent=2))
    print("\n| section | variant | value | unit | note |\n|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['section']} | {r['variant']} | {r['value']:.4g} | {r['unit']} | {r['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
