"""Engine: the offline API, modelled on `sglang.Engine`.

    engine = Engine(model_path="path/to/hf-checkpoint", dtype="bfloat16")
    out = engine.generate(prompt="Hello", sampling_params={"max_new_tokens": 16, "temperature": 0})
    out["text"], out["output_ids"], out["meta_info"]["finish_reason"]

With no model_path the engine serves the `tiny` preset with seeded random weights and the
shipped tiny tokenizer, so the whole path runs on a fresh machine with nothing downloaded.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import ModelConfig, preset
from minimax_jax.engine.runner import ModelRunner, StepOutput
from minimax_jax.engine.sampling import SamplingParams, SamplingParamsError
from minimax_jax.engine.tokenizer import find_stop
from minimax_jax.engine.scheduler import RankPlan, Request, ScheduledStep, Scheduler, assemble, powers_of_two
from minimax_jax.kv_cache import PageAllocator
from minimax_jax.model import MiniMaxM2
from minimax_jax.ops import attention as attention_ops, moe as moe_ops
from sharding.mesh import Layout

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16, "auto": jnp.bfloat16}
KV_CACHE_DTYPES = {"auto": None, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp8_e4m3": jnp.float8_e4m3fn}


class RequestError(ValueError):
    """A request the engine refuses; the message names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class EngineArgs:
    model_path: str | None = None
    dtype: str = "bfloat16"
    quantization: str | None = None          # experts on device: "fp8", "modelopt_fp4"; None: as the checkpoint
    tp_size: int = 1
    dp_size: int = 1
    ep_size: int | None = None               # None: experts over all devices when they divide
    enable_dp_attention: bool = False
    moe_dispatch_fp4: bool | None = None     # NVFP4 all-gather of the MoE dispatch; None: on with NVFP4 experts
    moe_dispatch_fp8: bool = True            # W8A8 experts: all-gather their FP8-rounded tokens, not bf16
    moe_combine: str = "reduce_scatter"      # or "all_reduce"
    enable_ar_fusion: bool = True            # reduce-scatter + residual add + RMSNorm + all-gather
    context_length: int | None = None
    max_running_requests: int = 64
    page_size: int = 16
    max_total_tokens: int | None = None      # KV cache capacity in tokens per dp rank
    chunked_prefill_size: int | None = None  # None: PREFILL_DEFAULTS for the platform
    max_prefill_tokens: int | None = None    # likewise
    random_seed: int = 0
    tokenizer_path: str | None = None
    load_format: str = "auto"                # "dummy": random weights of the config's shapes, made on device
    json_model_override_args: str | None = None   # JSON dict over config.json, e.g. '{"num_hidden_layers": 4}'
    moe_kernel: str = "auto"                 # expert grouped GEMM: one of ops.moe.KERNELS (resolve_kernel)
    attention_backend: str = "auto"          # prefill attention: "xla" (the reference), "cudnn"; auto: cudnn on GPUs (16-bit)
    decode_attention_backend: str = "auto"   # decode attention: "xla" (the reference), "pallas"; auto: pallas on GPUs (16-bit)
    kv_cache_dtype: str = "auto"             # "auto" (the model dtype), "bf16", "fp8_e4m3" (scale 1)
    mem_fraction_static: float = 0.85        # of each device's memory limit: weights + KV cache (GPUs,
                                             # when max_total_tokens is not given)
    cuda_graph_max_bs: int = 0               # decode steps of at most this many slots per dp rank run as
                                             # XLA command buffers (CUDA graphs) of every thunk; 0: XLA's defaults
    disable_radix_cache: bool = False        # no prefix caching: every prompt is computed whole


# (chunked_prefill_size, max_prefill_tokens) per platform. On GPUs every prefill step pays fixed
# costs (each layer's quantised experts dequantised, every weight read): on 4x H200, W1 ran 12%
# faster with steps of 8192 tokens per rank than with 4096 (docs/benchmarks.md, run AE).
PREFILL_DEFAULTS = {"gpu": (8192, 8192), "other": (256, 1024)}


def prefill_defaults(args: EngineArgs, platform: str) -> EngineArgs:
    """args with the prefill sizes left None filled in for platform (jax.default_backend())."""
    chunk, budget = PREFILL_DEFAULTS["gpu" if platform == "gpu" else "other"]
    return dataclasses.replace(args, chunked_prefill_size=args.chunked_prefill_size or chunk,
                               max_prefill_tokens=args.max_prefill_tokens or budget)


class Engine:
    def __init__(self, **kwargs: Any):
        self.args = args = prefill_defaults(EngineArgs(**kwargs), jax.default_backend())
        if args.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
        if args.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {args.kv_cache_dtype!r}")
        if not 0 < args.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {args.mem_fraction_static}")
        if args.cuda_graph_max_bs < 0:
            raise ValueError(f"cuda_graph_max_bs must be >= 0, got {args.cuda_graph_max_bs}")
        moe_ops.check_kernel(args.moe_kernel)              # else the first step's trace would say so
        # Mosaic GPU kernels run on Hopper only; the NVFP4 Triton kernel also runs interpreted on CPUs
        hopper_only = args.moe_kernel.startswith("mosaic") or (
            args.moe_kernel == "triton-nvfp4" and jax.default_backend() == "gpu")
        if hopper_only and not moe_ops.on_hopper():
            raise ValueError(f"moe_kernel {args.moe_kernel} runs kernels that need an NVIDIA Hopper GPU (H100 or "
                             f"H200); this device is {jax.devices()[0].device_kind}: use auto or xla")
        attention_ops.resolve_backend(args.attention_backend)
        attention_ops.resolve_decode_backend(args.decode_attention_backend)
        self.model, self.loaded_from = _load(args)
        self.cfg: ModelConfig = self.model.cfg
        self.tokenizer = _load_tokenizer(args)
        self.context_length = min(args.context_length or self.cfg.max_position_embeddings,
                                  self.cfg.max_position_embeddings)
        fp4_dispatch = args.moe_dispatch_fp4
        if fp4_dispatch is None:
            fp4_dispatch = self.model.expert_format == "nvfp4"
        self.layout = Layout.from_sglang(
            args.tp_size, args.dp_size, args.ep_size, args.enable_dp_attention, self.cfg.num_experts,
            fp4_dispatch=fp4_dispatch, fp8_dispatch=args.moe_dispatch_fp8, combine=args.moe_combine,
            ar_fusion=args.enable_ar_fusion)
        self.pages_per_seq = -(-self.context_length // args.page_size)
        per_rank = -(-args.max_running_requests // self.layout.dp)
        num_pages = None                 # GPUs: as many as fit beside the weights
        if args.max_total_tokens or jax.default_backend() == "cpu":
            total_tokens = args.max_total_tokens or self.context_length * min(args.max_running_requests, 8)
            num_pages = max(-(-total_tokens // args.page_size), self.pages_per_seq)
        # A step keeps AR fusion only when its tokens divide over tp (sharding/forward.py): the
        # largest decode batch is padded up to a multiple of tp, the smaller ones are powers of two
        largest = -(-per_rank // self.layout.tp) * self.layout.tp if self.layout.ar_fusion else per_rank
        self.batch_buckets = powers_of_two(1, largest)
        self.runner = ModelRunner(self.model, self.layout, num_pages, args.page_size, seed=args.random_seed,
                                  moe_kernel=args.moe_kernel, max_slots=self.layout.dp * self.batch_buckets[-1],
                                  kv_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype] or DTYPES[args.dtype],
                                  mem_fraction_static=args.mem_fraction_static,
                                  max_pages_per_rank=per_rank * self.pages_per_seq,
                                  attention_backend=args.attention_backend,
                                  decode_attention_backend=args.decode_attention_backend,
                                  cuda_graph_max_bs=args.cuda_graph_max_bs)
        num_pages = self.runner.pages_per_rank
        if num_pages < self.pages_per_seq:
            raise ValueError(f"the KV cache holds {num_pages * args.page_size} tokens per dp rank, less than "
                             f"one sequence of context_length={self.context_length}: lower --context-length "
                             f"or raise --mem-fraction-static")
        chunk = args.chunked_prefill_size
        self.token_buckets = powers_of_two(16, chunk) if chunk > 16 else [16]
        cache_pages = None if args.disable_radix_cache else args.page_size
        self.schedulers = [Scheduler(PageAllocator(num_pages, cache_pages), args.page_size, per_rank,
                                     args.chunked_prefill_size, args.max_prefill_tokens,
                                     self.batch_buckets, self.token_buckets)
                           for _ in range(self.layout.dp)]
        self.eos_ids = set(self.cfg.eos_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.on_step: list[Callable[[ScheduledStep, float], None]] = []
        self._inflight: tuple | None = None      # (scheduled, device outputs, launch time, timings)
        # per recent step: kind, shape [slots, T], and seconds spent planning, launching, waiting
        # for the result, from launch to result (device), and appending tokens; done: when its
        # result was read (time.perf_counter)
        self.step_times: collections.deque = collections.deque(maxlen=4096)
        log.info("engine ready: %s on dp=%d x tp=%d, %d KV pages of %d tokens per dp rank",
                 self.loaded_from, self.layout.dp, self.layout.tp, num_pages, args.page_size)

    # -- requests ------------------------------------------------------------------------------

    def make_request(self, prompt: str | None = None, input_ids: list[int] | None = None,
                     sampling_params: dict | SamplingParams | None = None, rid: str | None = None,
                     logprob_start_len: int = -1) -> Request:
        """Validates and tokenises one request (not yet queued). logprob_start_len >= 0: the
        log-probabilities of the prompt's tokens from that position on (prompt logprobs, as
        sglang's `logprob_start_len`; position 0 has none), computed even with max_new_tokens 0."""
        try:
            params = sampling_params if isinstance(sampling_params, SamplingParams) \
                else SamplingParams.from_dict(sampling_params)
        except SamplingParamsError as e:
            raise RequestError(str(e), param=str(e).split()[0]) from None
        except TypeError as e:
            raise RequestError(f"bad sampling parameter: {e}", param="sampling_params") from None
        if input_ids is None:
            if prompt is None:
                raise RequestError("give either prompt or input_ids", param="prompt")
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: give input_ids", param="prompt")
            input_ids = self.tokenizer.encode(prompt)
        input_ids = [int(t) for t in input_ids]
        if not input_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.cfg.vocab_size for t in input_ids):
            raise RequestError(f"input_ids must be in [0, {self.cfg.vocab_size})", param="input_ids")
        if params.logit_bias and max(params.logit_bias) >= self.cfg.vocab_size:
            raise RequestError(f"logit_bias token ids must be in [0, {self.cfg.vocab_size})", param="logit_bias")
        if len(input_ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(input_ids)} tokens; the context length is "
                               f"{self.context_length}", param="prompt")
        if len(input_ids) + params.max_new_tokens > self.context_length:
            raise RequestError(f"prompt ({len(input_ids)} tokens) + max_new_tokens "
                               f"({params.max_new_tokens}) exceeds the context length {self.context_length}",
                               param="max_new_tokens")
        if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise RequestError(f"logprob_start_len must be -1 (no prompt logprobs) or a position >= 0, "
                               f"got {logprob_start_len!r}", param="logprob_start_len")
        req = Request(prompt_ids=input_ids, params=params, logprob_start_len=logprob_start_len)
        if rid is not None:
            req.rid = rid
        # unseeded requests draw from (server seed, request id): reproducible across restarts
        req.seed = params.seed % 2**32 if params.seed is not None else \
            zlib.crc32(f"{self.args.random_seed}/{req.rid}".encode())
        return req

    def compile_decode(self, num_requests: int, context_lengths: Iterable[int],
                       sampling_params: dict | SamplingParams | None = None) -> int:
        """Compiles, without running them, the decode steps of `num_requests` running requests
        (spread over the dp ranks as `submit` spreads them) while their sequences hold
        `context_lengths` tokens: one executable per page-table width those lengths need. A
        workload decoding at that concurrency and those lengths then compiles nothing; a server
        warms its usual batch this way instead of stalling on a compile as contexts grow.
        Penalised sampling is refused: its steps compile per length of the outputs it reads.
        Returns how many executables were new."""
        params = sampling_params if isinstance(sampling_params, SamplingParams) \
            else SamplingParams.from_dict(sampling_params)
        if params.frequency_penalty or params.presence_penalty:
            raise ValueError("compile_decode covers unpenalised sampling: a penalised step's executable "
                             "depends on how many tokens each request has output")
        per_rank = -(-num_requests // self.layout.dp)
        if not 0 < per_rank <= self.batch_buckets[-1]:
            raise ValueError(f"num_requests must be in [1, {self.layout.dp * self.batch_buckets[-1]}] "
                             f"(max_running_requests), got {num_requests}")
        lengths = set(context_lengths)
        if not lengths or not 0 < min(lengths) <= max(lengths) <= self.context_length:
            raise ValueError(f"context lengths must be in [1, {self.context_length}], got {sorted(lengths)[:8]}")
        page = self.args.page_size
        before = self.num_compiles
        for pages in sorted({-(-n // page) for n in lengths}):
            stand_in = Request(prompt_ids=[0], params=params, pages=[0] * pages)   # only shapes matter
            plan = RankPlan([stand_in] * per_rank, [[0]] * per_rank, [pages * page - 1] * per_rank,
                            [True] * per_rank, [-1] * per_rank)
            step = assemble([plan] * self.layout.dp, self.batch_buckets, self.token_buckets,
                            self.pages_per_seq, page)
            self.runner.compile(step.step, step.logit_index, step.sampling, step.sources)
        return self.num_compiles - before

    def submit(self, req: Request) -> Request:
        if req.params.max_new_tokens == 0 and not req.input_logprobs:
            req.finish_reason = {"type": "length", "length": 0}
            return req
        req.scheduler = self._rank_for(req)
        req.scheduler.add(req)
        return req

    def _rank_for(self, req: Request) -> Scheduler:
        """The dp rank a new request joins: of the ranks at most an eighth (at least 1) more
        loaded than the least loaded one, the one whose prefix cache holds most of the prompt (a
        chat's next turn goes where its previous turns' pages are), then the least loaded."""
        least = min(s.load for s in self.schedulers)
        near = [s for s in self.schedulers if s.load <= least + max(1, least // 8)]
        if len(near) == 1:
            return near[0]
        return max(near, key=lambda s: (s.cached_pages(req.prompt_ids, req.logprob_start_len), -s.load))

    def abort(self, rid: str) -> bool:
        for scheduler in self.schedulers:
            req = scheduler.abort(rid)
            if req is not None:
                if req.finish_reason is None:
                    req.finish_reason = {"type": "abort"}
                return True
        return False

    def has_work(self) -> bool:
        return self._inflight is not None or any(s.has_work() for s in self.schedulers)

    @property
    def num_running(self) -> int:
        return sum(len(s.running) for s in self.schedulers)

    @property
    def num_waiting(self) -> int:
        return sum(len(s.waiting) for s in self.schedulers)

    @property
    def kv_pages_used(self) -> int:
        return sum(s.allocator.num_used for s in self.schedulers)

    @property
    def kv_pages_total(self) -> int:
        return sum(s.allocator.num_pages for s in self.schedulers)

    @property
    def kv_pages_cached(self) -> int:
        return sum(s.allocator.num_cached for s in self.schedulers)

    def flush_cache(self) -> int:
        """Empties the prefix cache of the pages no running request holds; returns how many."""
        return sum(s.allocator.flush() for s in self.schedulers)

    # -- stepping ------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Launches the next step, then reads back the previous one while it runs; returns the
        requests that got a new token.

        Host work for step n+1 (planning, assembling, dispatch) overlaps step n on the device:
        a decode slot whose input token step n samples reads it on the device. A request that
        stops at step n (EOS, stop string) may already sit in step n+1; that extra token is
        dropped. Penalties need every output token on the host, so they wait for step n.
        """
        updated = self._collect() if self._penalties_running() else []
        began = time.perf_counter()
        plans = [s.plan() for s in self.schedulers]
        if all(p is None for p in plans):
            return updated + self._collect()
        scheduled = assemble(plans, self.batch_buckets, self.token_buckets, self.pages_per_seq, self.args.page_size)
        planned = time.perf_counter()
        out = self.runner.launch(scheduled.step, scheduled.logit_index, scheduled.sampling, scheduled.sources,
                                 scheduled.targets)
        for scheduler, plan in zip(self.schedulers, plans):
            if plan is not None:
                scheduler.advance(plan)
        for slot, req in scheduled.sampled():
            req.pending += 1
            req.pending_slot = slot
        launched = time.perf_counter()
        updated += self._collect()
        self._inflight = (scheduled, out, launched, {"plan": planned - began, "launch": launched - planned})
        return updated

    def _collect(self) -> list[Request]:
        """Reads back the step in flight, if any, and appends its tokens."""
        if self._inflight is None:
            return []
        scheduled, out, launched, times = self._inflight
        self._inflight = None
        waited = time.perf_counter()
        result = self.runner.read(out)
        done = time.perf_counter()
        if scheduled.targets is not None:
            self._record_prompt_logprobs(scheduled, result)
        updated = []
        for slot, req in scheduled.sampled():
            req.pending -= 1
            if self._append_token(req, result, slot):
                updated.append(req)
        times.update(kind="decode" if scheduled.step.tokens.shape[1] == 1 else "prefill",
                     shape=scheduled.step.tokens.shape, wait=done - waited, device=done - launched,
                     post=time.perf_counter() - done, done=done)
        self.step_times.append(times)
        for hook in self.on_step:
            hook(scheduled, done - launched)
        return updated

    def _penalties_running(self) -> bool:
        return any(r.params.frequency_penalty or r.params.presence_penalty
                   for s in self.schedulers for r in s.running)

    @staticmethod
    def _record_prompt_logprobs(scheduled: ScheduledStep, out: StepOutput) -> None:
        """Each scored position's log-probability of the prompt token after it, into the
        request's input_logprobs (index: that token's position less logprob_start_len)."""
        for slot, req, start, n in scheduled.chunks():
            for j in np.flatnonzero(scheduled.targets[slot, :n] >= 0):
                index = start + int(j) + 1 - req.logprob_start_len
                req.input_logprobs[index] = float(out.prompt_logprobs[slot, j])
                if req.params.top_logprobs_num:
                    k = req.params.top_logprobs_num
                    req.input_top_logprobs[index] = [(float(v), int(t)) for v, t in zip(
                        out.prompt_top_logprobs[slot, j, :k], out.prompt_top_ids[slot, j, :k])]

    def _append_token(self, req: Request, out: StepOutput, i: int) -> bool:
        if req.finished:
            return False
        if req.params.max_new_tokens == 0:      # scored its prompt only
            req.scheduler.finish(req, {"type": "length", "length": 0})
            return True
        token = int(out.tokens[i])
        req.output_ids.append(token)
        req.output_logprobs.append(float(out.logprobs[i]))
        k = req.params.top_logprobs_num
        if k:
            req.output_top_logprobs.append([(float(v), int(t)) for v, t in zip(out.top_logprobs[i, :k], out.top_ids[i, :k])])
        reason = self._finish_reason(req, token)
        if reason is not None:
            req.scheduler.finish(req, reason)
        return True

    def _finish_reason(self, req: Request, token: int) -> dict | None:
        p = req.params
        if token in p.stop_token_ids:
            return {"type": "stop", "matched": token}
        if not p.ignore_eos and token in self.eos_ids:
            return {"type": "stop", "matched": token}
        if p.stop and self.tokenizer is not None:
            # a stop string completed by this token lies in the last few tokens' text
            window = max(len(s) for s in p.stop) + 8
            text = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=p.skip_special_tokens)
            at = find_stop(text, p.stop)
            if at >= 0:
                matched = min((s for s in p.stop if s and text.find(s) == at), key=len)
                return {"type": "stop", "matched": matched}
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # -- offline API ---------------------------------------------------------------------------

    def generate(self, prompt: str | list[str] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict | list[dict] | None = None,
                 return_logprob: bool = False, logprob_start_len: int = -1) -> dict | list[dict]:
        """Generates for one prompt (returns a dict) or a batch (returns a list of dicts).
        return_logprob: meta_info holds the output tokens' log-probabilities and, from
        logprob_start_len >= 0, the prompt's (`make_request`)."""
        single = isinstance(prompt, str) or (input_ids is not None and input_ids and isinstance(input_ids[0], int))
        prompts = [prompt] if isinstance(prompt, str) else prompt
        ids = [input_ids] if single and input_ids is not None else input_ids
        n = len(prompts if prompts is not None else ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        reqs = [self.make_request(prompt=prompts[i] if prompts else None,
                                  input_ids=ids[i] if ids else None, sampling_params=params[i],
                                  logprob_start_len=logprob_start_len if return_logprob else -1)
                for i in range(n)]
        for req in reqs:
            self.submit(req)
        self.run_until_done()
        outs = [self.result(req, return_logprob) for req in reqs]
        return outs[0] if single else outs

    def result(self, req: Request, return_logprob: bool = False) -> dict:
        text = self.decode(req.output_ids, req.params) if self.tokenizer is not None else ""
        stop = req.finish_reason or {}
        if stop.get("type") == "stop" and isinstance(stop.get("matched"), str):
            text = text[:find_stop(text, req.params.stop)]
        meta = {"id": req.rid, "prompt_tokens": len(req.prompt_ids), "cached_tokens": req.cached_tokens,
                "completion_tokens": len(req.output_ids), "finish_reason": req.finish_reason}
        if return_logprob:
            meta["output_token_logprobs"] = [
                (lp, t, self._token_text(t)) for lp, t in zip(req.output_logprobs, req.output_ids)]
            if req.output_top_logprobs:
                meta["output_top_logprobs"] = [[(lp, t, self._token_text(t)) for lp, t in step]
                                               for step in req.output_top_logprobs]
            if req.logprob_start_len >= 0:
                scored = req.prompt_ids[req.logprob_start_len:]
                meta["input_token_logprobs"] = [(lp, t, self._token_text(t))
                                                for lp, t in zip(req.input_logprobs, scored)]
                if req.params.top_logprobs_num:
                    meta["input_top_logprobs"] = [
                        None if step is None else [(lp, t, self._token_text(t)) for lp, t in step]
                        for step in req.input_top_logprobs]
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}

    def decode(self, ids: list[int], params: SamplingParams | None = None) -> str:
        skip = params.skip_special_tokens if params is not None else True
        return self.tokenizer.decode(ids, skip_special_tokens=skip)

    def _token_text(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    @property
    def num_compiles(self) -> int:
        return self.runner.num_compiles


def _model_config(args: EngineArgs) -> ModelConfig:
    """The preset named by model_path (or tiny), or the checkpoint's config.json, with overrides."""
    import json
    from minimax_jax.config import PRESETS
    from minimax_jax.checkpoint import is_converted_checkpoint, manifest_config, read_manifest
    if args.model_path is None or args.model_path in PRESETS:
        cfg = preset(args.model_path or "tiny").to_hf()
    elif is_converted_checkpoint(args.model_path):
        cfg = manifest_config(read_manifest(args.model_path)).to_hf()
    else:
        cfg = json.loads((Path(args.model_path) / "config.json").read_text())
    if args.json_model_override_args:
        cfg.update(json.loads(args.json_model_override_args))
    return ModelConfig.from_hf(cfg)


def _load(args: EngineArgs) -> tuple[MiniMaxM2, str]:
    from minimax_jax.config import PRESETS
    from minimax_jax.loader import QUANTIZATION_TO_FORMAT, detect_quantization, load_model
    if args.quantization not in QUANTIZATION_TO_FORMAT:
        raise ValueError(f"quantization must be fp8 or modelopt_fp4, got {args.quantization!r}")
    if args.load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be auto or dummy, got {args.load_format!r}")
    dtype = DTYPES[args.dtype]
    fmt = QUANTIZATION_TO_FORMAT[args.quantization]
    if args.load_format == "dummy":      # abstract: the runner draws the weights on the devices
        cfg = _model_config(args)
        model = nnx.eval_shape(lambda: MiniMaxM2(cfg, dtype=dtype, expert_format=fmt, rngs=nnx.Rngs(args.random_seed)))
        return model, f"random weights of {args.model_path or 'tiny'} ({cfg.num_layers} layers, {fmt} experts)"
    if args.model_path is None or args.model_path in PRESETS:
        cfg = _model_config(args)
        model = MiniMaxM2(cfg, dtype=dtype, expert_format=fmt, rngs=nnx.Rngs(args.random_seed))
        return model, f"the embedded {args.model_path or 'tiny'} preset (random weights, {fmt} experts)"
    from minimax_jax.checkpoint import is_converted_checkpoint, restore_for_engine
    if is_converted_checkpoint(args.model_path):     # made by scripts/convert_hf.py
        return restore_for_engine(args.model_path, dtype, args)
    quantization = args.quantization or detect_quantization(args.model_path)
    model = load_model(args.model_path, dtype=dtype, quantization=quantization, progress=True)
    return model, f"HF checkpoint {args.model_path} ({model.expert_format} experts)"


def _load_tokenizer(args: EngineArgs):
    from minimax_jax.engine.tokenizer import Tokenizer
    from minimax_jax.config import PRESETS
    path = args.tokenizer_path or args.model_path
    if path is None or path == "tiny":
        return Tokenizer.tiny()
    if path in PRESETS:
        return None             # random weights of a full-size preset: requests give input_ids
    if (Path(path) / "tokenizer.json").exists():
        return Tokenizer.from_dir(path)
    log.warning("no tokenizer.json in %s: requests must give input_ids", path)
    return None
