"""Restore time of converted checkpoints: the tiny preset's shapes and a ~2 GB synthetic model.

    python benchmarks/restore_time.py --workdir /tmp/restore-bench [--size-gb 2] [--repeat 3]

For each size: writes a synthetic HF checkpoint (random bf16 data, written tensor by tensor with
the safetensors layout, no torch), converts it with scripts/convert_hf.py, then times
restore_model onto one device and onto dp2 x tp4 of 8 (simulated, on a CPU host) devices, and
load_model of the HF directory for comparison. Every time is wall clock until all arrays are
ready; the best of --repeat runs is printed. Existing files in --workdir are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BF16_SAFE_BITS = np.uint16(0xBFFF)     # clears the top exponent bit: finite values, |x| < 2


def synthetic_hf_config(num_layers: int, hidden: int = 1024, intermediate: int = 512, experts: int = 16,
                        vocab: int = 1024, heads: int = 8, kv_heads: int = 2, head_dim: int = 128) -> dict[str, Any]:
    """A transformers-5 MiniMax-M2 config.json dict (wide experts, few layers by default)."""
    return {"architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": num_layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "rotary_dim": head_dim // 2, "num_local_experts": experts, "num_experts_per_tok": 2,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def hf_tensor_shapes(cfg: dict[str, Any]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The released tensor names and shapes, grouped by file: top-level tensors, then one group a layer."""
    h, i, e, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    groups = [[("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        group = [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                 (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                 (p + "self_attn.q_norm.weight", (q,)), (p + "self_attn.k_norm.weight", (kv,)),
                 (p + "block_sparse_moe.gate.weight", (e, h)), (p + "block_sparse_moe.e_score_correction_bias", (e,))]
        for j in range(e):
            ex = f"{p}block_sparse_moe.experts.{j}."
            group += [(ex + "w1.weight", (i, h)), (ex + "w3.weight", (i, h)), (ex + "w2.weight", (h, i))]
        groups.append(group)
    return groups


def _write_safetensors(file: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> int:
    """One bf16 safetensors file, each tensor's random data generated and written in turn."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            bits = np.frombuffer(rng.bytes(int(np.prod(shape)) * 2), np.uint16) & BF16_SAFE_BITS
            f.write(bits.tobytes())
    return offset


def write_synthetic_hf_checkpoint(path: str | Path, cfg: dict[str, Any], seed: int = 0) -> int:
    """A sharded HF checkpoint (one file per layer + index) of random bf16 data; returns its
    tensor bytes. Memory stays at one tensor whatever the size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = hf_tensor_shapes(cfg)
    weight_map, total = {}, 0
    for n, tensors in enumerate(groups):
        file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        total += _write_safetensors(path / file, tensors, rng)
        weight_map.update({name: file for name, _ in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


def layers_for_bytes(target_bytes: float, **shape: Any) -> int:
    """How many layers of synthetic_hf_config(..., **shape) make about target_bytes."""
    one = sum(int(np.prod(s)) * 2 for _, s in hf_tensor_shapes(synthetic_hf_config(1, **shape))[1])
    return max(1, round(target_bytes / one))


def _timed(fn: Callable[[], Any], repeat: int) -> float:
    import jax
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out))
        best = min(best, time.perf_counter() - start)
        del out
    return best


def bench(name: str, cfg: dict[str, Any], workdir: Path, repeat: int) -> None:
    import jax.numpy as jnp
    from flax import nnx

    from minimax_jax import checkpoint
    from minimax_jax.loader import load_model
    from sharding.mesh import Layout

    hf, converted = workdir / f"{name}-hf", workdir / f"{name}-converted"
    if not (hf / "config.json").exists():
        write_synthetic_hf_checkpoint(hf, cfg)
    if not checkpoint.is_converted_checkpoint(converted):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "scripts/convert_hf.py"), str(hf), str(converted), "--quiet"],
                       check=True)
        print(f"{name}: converted in {time.perf_counter() - start:.1f} s (subprocess, imports included)")
    manifest = checkpoint.read_manifest(converted)
    model_cfg = checkpoint.manifest_config(manifest)
    layout = Layout(dp=2, tp=4)
    shardings = checkpoint.layout_shardings(layout, model_cfg)
    restore = lambda s=None: nnx.state(checkpoint.restore_model(converted, jnp.bfloat16, s))
    print(f"{name}: {checkpoint.format_size(manifest['total_bytes'])}, {manifest['tensor_count']} tensors, "
          f"{model_cfg.num_layers} layers")
    print(f"  restore_model, 1 device:              {_timed(restore, repeat):8.3f} s")
    print(f"  restore_model, dp2 x tp4 (8 devices): {_timed(lambda: restore(shardings), repeat):8.3f} s")
    load = lambda: nnx.state(load_model(hf, jnp.bfloat16))
    print(f"  load_model of the HF directory:        {_timed(load, repeat):8.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where the synthetic and converted checkpoints go (created)")
    p.add_argument("--size-gb", type=float, default=2.0,
                   help="size of the large synthetic model (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per measurement; the best is printed (default: %(default)s)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, str(ROOT))
    import jax

    from minimax_jax.config import preset

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}, cpus: {os.cpu_count()}")
    bench("tiny", preset("tiny").to_hf(), workdir, args.repeat)
    size = f"{args.size_gb:g}gb"
    bench(f"synthetic-{size}", synthetic_hf_config(layers_for_bytes(args.size_gb * 1e9)), workdir, args.repeat)


if __name__ == "__main__":
    main()
