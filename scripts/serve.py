"""OpenAI-compatible HTTP server for minimax-jax (flag names follow sglang's launch_server).

    python scripts/serve.py --model-path /path/to/hf-checkpoint --port 30000
    python scripts/serve.py            # the embedded tiny preset, random weights

Prints "serving <what was loaded> on http://HOST:PORT" once it accepts connections; SIGINT or
SIGTERM finish in-flight requests (up to --graceful-shutdown-timeout), stop the engine thread
and exit 0. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minimax_jax.process_env import apply_defaults  # noqa: E402

apply_defaults()            # before JAX starts: multicast off, XLA's pool 92% of each card

import uvicorn  # noqa: E402

from minimax_jax.engine.async_engine import AsyncEngine  # noqa: E402
from minimax_jax.engine.engine import DTYPES, KV_CACHE_DTYPES, PREFILL_DEFAULTS, EngineArgs  # noqa: E402
from minimax_jax.ops.attention import BACKENDS as ATTENTION_BACKENDS, DECODE_BACKENDS  # noqa: E402
from minimax_jax.ops.moe import KERNELS as MOE_KERNELS  # noqa: E402
from minimax_jax.server.protocol import REASONING_PARSERS  # noqa: E402

log = logging.getLogger("minimax_jax.serve")
TINY_MODEL_NAME = "minimax-jax-tiny"

# flag dest -> EngineArgs field; None values leave the engine default
ENGINE_FLAGS = {
    "model_path": "model_path", "tokenizer_path": "tokenizer_path", "dtype": "dtype",
    "quantization": "quantization", "tp_size": "tp_size", "dp_size": "dp_size", "ep_size": "ep_size",
    "enable_dp_attention": "enable_dp_attention", "moe_dispatch_fp4": "moe_dispatch_fp4",
    "moe_dispatch_fp8": "moe_dispatch_fp8",
    "moe_combine": "moe_combine", "enable_ar_fusion": "enable_ar_fusion", "context_length": "context_length",
    "max_running_requests": "max_running_requests", "page_size": "page_size",
    "chunked_prefill_size": "chunked_prefill_size", "max_prefill_tokens": "max_prefill_tokens",
    "max_total_tokens": "max_total_tokens", "random_seed": "random_seed",
    "load_format": "load_format", "json_model_override_args": "json_model_override_args",
    "moe_kernel": "moe_kernel", "attention_backend": "attention_backend", "kv_cache_dtype": "kv_cache_dtype",
    "decode_attention_backend": "decode_attention_backend",
    "mem_fraction_static": "mem_fraction_static", "cuda_graph_max_bs": "cuda_graph_max_bs",
    "disable_radix_cache": "disable_radix_cache",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--model-path", help="HF checkpoint directory (config.json + *.safetensors: bf16, "
                                            "FP8 release, ModelOpt NVFP4), a checkpoint made by "
                                            "scripts/convert_hf.py, or with --load-format dummy a preset "
                                            "name; omitted: the embedded tiny preset with random weights")
    model.add_argument("--tokenizer-path", help="directory with tokenizer.json (default: --model-path; "
                                                "the shipped tiny tokenizer without --model-path)")
    model.add_argument("--served-model-name", help="model name clients must send in 'model' "
                                                   f"(default: --model-path, or {TINY_MODEL_NAME!r})")
    model.add_argument("--dtype", choices=[d for d in ("auto", "bfloat16", "float32") if d in DTYPES],
                       default="auto", help="weight and activation dtype (auto: bfloat16)")
    model.add_argument("--quantization", choices=["fp8", "modelopt_fp4"],
                       help="quantization of the expert weights on device (default: as the checkpoint); "
                            "refused with 'not supported yet' if the engine has no quantization option")
    model.add_argument("--context-length", type=int, help="max prompt + output tokens per request "
                                                          "(default and cap: the model's max_position_embeddings)")
    model.add_argument("--load-format", choices=["auto", "dummy"],
                       help="dummy: random weights of the config's exact shapes, drawn on the devices "
                            "(--model-path may then name a preset: tiny, minimax-m2.5)")
    model.add_argument("--json-model-override-args",
                       help="JSON object merged over config.json, e.g. '{\"num_hidden_layers\": 4}'")
    model.add_argument("--random-seed", type=int, help="seed of the random tiny weights and of unseeded sampling")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="accepted so that sglang command lines run unchanged; no effect: the model's code "
                            "is this package's, nothing is imported from the checkpoint")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tp-size", type=int, help="tensor parallel size")
    par.add_argument("--dp-size", type=int, help="data parallel size")
    par.add_argument("--ep-size", type=int, help="expert parallel size (default: the engine's choice)")
    par.add_argument("--enable-dp-attention", action="store_true", default=None,
                     help="data-parallel attention with expert-parallel MoE")
    par.add_argument("--moe-dispatch-fp4", action=argparse.BooleanOptionalAction, default=None,
                     help="NVFP4-quantised all-gather of the MoE token dispatch (engine default: on "
                          "with NVFP4 experts, as sglang's FP4 all-gather)")
    par.add_argument("--disable-flashinfer-cutlass-moe-fp4-allgather", dest="moe_dispatch_fp4",
                     action="store_false", help="sglang's name for --no-moe-dispatch-fp4")
    par.add_argument("--moe-dispatch-fp8", action=argparse.BooleanOptionalAction, default=None,
                     help="with FP8 experts run W8A8 (moe kernel mosaic-ws-w8a8, auto on Hopper, or its "
                          "reference xla-w8a8): all-gather the tokens as the experts round them, FP8 codes "
                          "and scales, instead of bf16; the same numbers in about half the bytes (engine "
                          "default: on)")
    par.add_argument("--moe-combine", choices=["reduce_scatter", "all_reduce"],
                     help="collective that combines the experts' outputs (engine default: reduce_scatter)")
    par.add_argument("--enable-ar-fusion", action=argparse.BooleanOptionalAction, default=None,
                     help="fuse reduce-scatter + residual add + RMSNorm + all-gather (engine default: on)")
    par.add_argument("--enable-flashinfer-allreduce-fusion", dest="enable_ar_fusion", action="store_true",
                     help="sglang's name for --enable-ar-fusion")

    par.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                     help="prefill attention: cudnn (flash attention) or the XLA reference; auto: cudnn on "
                     "GPUs for 16-bit models, the reference otherwise (default: auto)")
    par.add_argument("--decode-attention-backend", choices=DECODE_BACKENDS,
                     help="decode attention: pallas (a Triton kernel that reads the KV pages in place) or the "
                     "XLA reference; auto: pallas on GPUs for 16-bit models, the reference otherwise (default: auto)")
    par.add_argument("--moe-kernel", choices=MOE_KERNELS,
                     help="grouped GEMM of the experts: mosaic (bf16 Mosaic GPU; quantised experts dequantised "
                     "per layer), mosaic-ws (quantised experts dequantised per layer, then a warp-specialised "
                     "Mosaic GPU kernel on group-aligned rows), mosaic-fp8 (FP8 experts dequantised inside the "
                     "kernel), mosaic-w8a8 (FP8 experts against rows rounded to FP8 per row, FP8 wgmma), "
                     "mosaic-ws-w8a8 (FP8 experts as stored against rows rounded to FP8 per 128 columns, as the "
                     "checkpoint's dynamic activation scheme prescribes, warp-specialised FP8 wgmma), xla, "
                     "xla-w8a8 (the reference of the W8A8 numbers: rows rounded as mosaic-ws-w8a8 does), "
                     "triton-nvfp4 (NVFP4 experts as stored, widened to bf16 inside a Triton kernel); auto: on "
                     "Hopper, mosaic-ws-w8a8 with SwiGLU in its gate/up kernel for FP8 experts, triton-nvfp4 for "
                     "NVFP4 ones, else mosaic; xla elsewhere (pick mosaic-fp8 for weight-only numbers)")

    par.add_argument("--cuda-graph-max-bs", type=int,
                     help="decode steps of at most this many requests per dp rank run as XLA command buffers "
                     "(CUDA graphs) of every thunk kind, loops and collectives included (default: 0, XLA's own "
                     "command buffers only); set for the whole process on 4x H200, they made one request's decode 9%% "
                     "faster and 1209 requests' 0.9%% slower; this per-step form gave nothing on 2x H200")
    par.add_argument("--disable-cuda-graph", dest="cuda_graph_max_bs", action="store_const", const=0,
                     help="sglang's flag: --cuda-graph-max-bs 0")

    sched = p.add_argument_group("scheduling and KV cache")
    sched.add_argument("--max-running-requests", type=int, help="max requests decoded together")
    sched.add_argument("--page-size", type=int, help="tokens per KV cache page")
    (gpu_chunk, gpu_budget), (other_chunk, other_budget) = PREFILL_DEFAULTS["gpu"], PREFILL_DEFAULTS["other"]
    sched.add_argument("--chunked-prefill-size", type=int, help="max prompt tokens of one request per prefill step "
                       f"(default: {gpu_chunk} on GPUs, {other_chunk} elsewhere)")
    sched.add_argument("--max-prefill-tokens", type=int,
                       help="max prompt tokens of one prefill step per dp rank; nor may a request grow the "
                       f"step's padded shape past it (default: {gpu_budget} on GPUs, {other_budget} elsewhere)")
    sched.add_argument("--max-total-tokens", type=int, help="KV cache capacity in tokens of each dp rank, all its "
                       "requests together (default on GPUs: what fits in --mem-fraction-static)")
    sched.add_argument("--mem-fraction-static", type=float, help="share of each device's memory limit for "
                       "weights and KV cache; the rest is left to activations (default: 0.85)")
    sched.add_argument("--disable-radix-cache", action="store_true", default=None,
                       help="no prefix caching: by default a prompt starts on the KV pages an earlier request "
                       "computed for the same leading tokens (whole pages of --page-size tokens); POST /flush_cache "
                       "empties the cache")
    sched.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES),
                       help="KV cache storage: auto (the model dtype) or fp8_e4m3 with unit scale, half the "
                       "bytes (default: auto)")

    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    srv.add_argument("--port", type=int, default=30000, help="port to bind; 0 picks a free one (default: %(default)s)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer <key>' on /v1/*, /generate, /get_model_info "
                     "and /flush_cache (/health and /metrics stay open)")
    srv.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS),
                     help="minimax: split <think>...</think> of chat outputs into message.reasoning_content; "
                          "minimax-append-think: keep the whole output in the content with the <think> the chat "
                          "template opened put back in front, as MiniMax's own sglang command asks (default: "
                          "off, the raw text is the content)")
    srv.add_argument("--tool-call-parser", choices=["minimax-m2"],
                     help="turn <minimax:tool_call> blocks of chat outputs, for requests that offer tools, into "
                          "message.tool_calls with finish_reason tool_calls (default: off, they stay in the content)")
    srv.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                     help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    srv.add_argument("--graceful-shutdown-timeout", type=float, default=10.0,
                     help="seconds in-flight requests get to finish after SIGINT/SIGTERM (default: %(default)s)")
    srv.add_argument("--enable-metrics", action="store_true",
                     help="accepted so that sglang command lines run unchanged; /metrics (Prometheus) is always served")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                     help="log level of the server and the engine (default: %(default)s)")
    return p


def engine_kwargs(args: argparse.Namespace, fields: set[str] | None = None) -> dict[str, Any]:
    """Engine(**kwargs) from the given flags; raises ValueError for a flag whose field is not in
    `fields` (default: EngineArgs' fields)."""
    fields = fields if fields is not None else {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = {}
    for dest, field in ENGINE_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if field not in fields:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} {value} is not supported yet: the engine has no {field!r} option")
        kwargs[field] = value
    return kwargs


class _Server(uvicorn.Server):
    """Prints the ready line once the socket accepts connections; on shutdown, gives in-flight
    requests `grace` seconds, then stops the engine so their streams end with finish_reason
    abort and [DONE] instead of being cut off."""

    def __init__(self, config: uvicorn.Config, what: str, engine: AsyncEngine, grace: float):
        super().__init__(config)
        self.what, self.engine, self.grace = what, engine, grace

    async def shutdown(self, sockets: list | None = None) -> None:
        stopper = asyncio.create_task(self._stop_engine_after(self.grace))
        try:
            await super().shutdown(sockets)
        finally:
            stopper.cancel()

    async def _stop_engine_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self.engine.shutdown)

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f"serving {self.what} on http://{host}:{port}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kwargs = engine_kwargs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from minimax_jax.engine.engine import Engine
    from minimax_jax.server.app import ServerConfig, create_app
    from minimax_jax.server.metrics import ServerMetrics

    engine = Engine(**kwargs)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics)
    config = ServerConfig(served_model_name=args.served_model_name or args.model_path or TINY_MODEL_NAME,
                          api_key=args.api_key, reasoning_parser=args.reasoning_parser,
                          tool_call_parser=args.tool_call_parser,
                          max_request_bytes=args.max_request_bytes)
    app = create_app(async_engine, metrics, config)
    # uvicorn's own limit is a backstop: aborted streams need a moment to send their last chunk
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=args.graceful_shutdown_timeout + 5,
                               access_log=args.log_level == "debug")
    server = _Server(uv_config, engine.loaded_from, async_engine, args.graceful_shutdown_timeout)
    # uvicorn handles SIGINT/SIGTERM while serving, then re-raises the signal to the handler it
    # found: a no-op one lets us stop the engine and exit 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        async_engine.shutdown()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
