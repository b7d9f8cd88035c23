"""Converted (orbax) checkpoints: streamed conversion, restore onto any layout, clear refusals."""
import dataclasses
import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.torch import load_file, save_file

from benchmarks.restore_time import layers_for_bytes, synthetic_hf_config, write_synthetic_hf_checkpoint
from minimax_jax import checkpoint
from minimax_jax.config import preset
from minimax_jax.engine.engine import Engine
from minimax_jax.hf_testing import (make_hf_model, quantize_checkpoint_fp8, quantize_checkpoint_nvfp4,
                                    save_hf_checkpoint)
from minimax_jax.loader import detect_quantization, load_model
from minimax_jax.safetensors_index import CheckpointError, SafetensorsIndex

ROOT = Path(__file__).resolve().parent.parent
CONVERT = [sys.executable, str(ROOT / "scripts" / "convert_hf.py")]
# runs a command as its only child and prints the child's peak RSS (KiB) as the last line
RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
SYNTHETIC_BYTES = 2e9
LAYOUTS = {"1x1": {}, "tp8": dict(tp_size=8), "dp2-tp4": dict(tp_size=8, dp_size=2, enable_dp_attention=True)}
PROMPTS = [[3, 141, 59, 26, 5], [271, 82, 8, 18, 28, 459, 45, 23, 53, 60, 2]]
GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The default tiny model as HF checkpoints: bf16, the FP8 release format, ModelOpt NVFP4."""
    root = tmp_path_factory.mktemp("hf")
    bf16 = save_hf_checkpoint(make_hf_model(seed=0), root / "bf16", dtype="bfloat16")
    return {"bf16": bf16, "fp8": quantize_checkpoint_fp8(bf16, root / "fp8"),
            "nvfp4": quantize_checkpoint_nvfp4(bf16, root / "nvfp4")}


# FP8-release attention weights are dequantised at conversion: in float32 they are exactly what
# loading the HF directory in float32 gives; bf16 sources are exact in bfloat16.
CONVERT_DTYPE = {"bf16": jnp.bfloat16, "fp8": jnp.float32, "nvfp4": jnp.bfloat16}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    for name, src in hf_dirs.items():
        checkpoint.convert(src, root / name, dtype=CONVERT_DTYPE[name])
    return {name: root / name for name in hf_dirs}


def open_array(path: Path) -> ts.TensorStore:
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()


def flat_values(model) -> dict:
    return {tuple(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}


def assert_same_parameters(a, b) -> None:
    va, vb = flat_values(a), flat_values(b)
    assert va.keys() == vb.keys()
    for key in va:
        assert va[key].dtype == vb[key].dtype, key
        np.testing.assert_array_equal(va[key].view(np.uint8), vb[key].view(np.uint8), err_msg=str(key))


@pytest.mark.parametrize("source", ["bf16", "fp8", "nvfp4"])
def test_restored_parameters_equal_hf_load_bit_for_bit(hf_dirs, converted, source):
    src = hf_dirs[source]
    manifest = checkpoint.read_manifest(converted[source])
    assert manifest["complete"] and manifest["expert_format"] == source     # the source's own format
    assert manifest["tensor_count"] == len(manifest["parameters"])
    assert {f["name"] for f in manifest["source"]["files"]} == {"config.json", "model.safetensors"}
    restored = checkpoint.restore_model(converted[source], jnp.float32)
    assert_same_parameters(restored, load_model(src, jnp.float32, quantization=detect_quantization(src)))


def test_requantizing_conversion_equals_requantizing_load(hf_dirs, tmp_path):
    checkpoint.convert(hf_dirs["bf16"], tmp_path / "fp8", expert_format="fp8")
    restored = checkpoint.restore_model(tmp_path / "fp8", jnp.bfloat16)
    assert restored.expert_format == "fp8"
    assert_same_parameters(restored, load_model(hf_dirs["bf16"], jnp.bfloat16, quantization="fp8"))


def test_state_is_a_plain_orbax_checkpoint_restorable_onto_any_sharding(converted):
    """orbax alone restores a leaf sharded by expert over 8 devices, each device getting its slice."""
    state_dir = converted["bf16"] / "state"
    shape = tuple(checkpoint.read_manifest(converted["bf16"])["parameters"]["layers.experts.w13"]["shape"])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "tp"))
    sharding = NamedSharding(mesh, P(None, ("dp", "tp")))
    target = {"layers": {"experts": {"w13": jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)}}}
    args = {"layers": {"experts": {"w13": ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape)}}}
    out = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
    w13 = out["layers"]["experts"]["w13"]
    assert w13.sharding == sharding and {s.data.shape[1] for s in w13.addressable_shards} == {shape[1] // 8}
    np.testing.assert_array_equal(np.asarray(w13), open_array(state_dir / "layers.experts.w13").read().result())


def test_read_chunks_of_the_full_model_align_with_64_way_shards():
    """A device reading its shard reads no chunk it does not need (small leaves are one chunk)."""
    for leaf in checkpoint.model_leaves(preset("minimax-m2.5"), jnp.bfloat16, "fp8"):
        chunk = checkpoint.inner_chunk_shape(leaf)
        assert all(s % c == 0 for s, c in zip(leaf.shape[1:], chunk[1:])), leaf
        assert np.prod(chunk) * leaf.dtype.itemsize <= checkpoint.INNER_CHUNK_BYTES, (leaf, chunk)
        if leaf.nbytes // leaf.shape[0] <= checkpoint.INNER_CHUNK_BYTES:
            continue
        for axis in checkpoint._shardable_axes(leaf):
            if leaf.shape[axis] % 64 == 0:
                assert (leaf.shape[axis] // 64) % chunk[axis] == 0, (leaf, chunk)


@pytest.fixture(scope="module")
def greedy_reference(hf_dirs):
    """Greedy tokens of the engine loading each HF directory directly (one device, float32)."""
    out = {}
    for source in ("bf16", "fp8"):
        engine = Engine(model_path=str(hf_dirs[source]), dtype="float32", context_length=64, page_size=4)
        assert engine.loaded_from.startswith("HF checkpoint")
        out[source] = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_engine_on_converted_checkpoint_generates_the_hf_tokens_on_every_layout(
        converted, greedy_reference, source, layout):
    engine = Engine(model_path=str(converted[source]), dtype="float32", context_length=64, page_size=4,
                    **LAYOUTS[layout])
    assert engine.loaded_from.startswith(f"converted checkpoint {converted[source]}")
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == greedy_reference[source]
    # restored where the runner needs it: sharding the state again copied nothing
    _, restored = nnx.split(engine.model)
    placed = restored["layers"]["attn"]["wo"][...], engine.runner.state["layers"]["attn"]["wo"][...]
    assert [s.data.unsafe_buffer_pointer() for s in placed[0].addressable_shards] == \
           [s.data.unsafe_buffer_pointer() for s in placed[1].addressable_shards]


# -- memory and interruption --------------------------------------------------------------------


def peak_rss(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Runs cmd in a fresh process; returns its peak resident set in bytes."""
    out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, timeout=300)
    return int(out.stdout.strip().splitlines()[-1]) * 1024, out


@pytest.fixture
def scratch(tmp_path):
    """A temporary directory removed after the test (these tests write GBs)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def synthetic_2gb(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "hf"
    size = write_synthetic_hf_checkpoint(path, synthetic_hf_config(layers_for_bytes(SYNTHETIC_BYTES)))
    yield path, size
    shutil.rmtree(path.parent)


def test_converting_2gb_keeps_peak_rss_under_half_its_size_plus_the_baseline(hf_dirs, synthetic_2gb, scratch):
    src, size = synthetic_2gb
    # the constant: the same script converting the tiny model (python + jax + orbax + tensorstore)
    baseline, out = peak_rss([*CONVERT, str(hf_dirs["bf16"]), str(scratch / "tiny"), "--quiet"])
    assert out.returncode == 0, out.stderr
    peak, out = peak_rss([*CONVERT, str(src), str(scratch / "big"), "--quiet"])
    assert out.returncode == 0, out.stderr
    print(f"\nsynthetic {size / 1e9:.2f} GB: peak RSS {peak / 1e6:.0f} MB; baseline (tiny) {baseline / 1e6:.0f} MB; "
          f"bound {(0.5 * size + baseline) / 1e6:.0f} MB")
    assert peak < 0.5 * size + baseline
    manifest = checkpoint.read_manifest(scratch / "big")
    assert manifest["total_bytes"] >= size * 0.99
    # spot check: a middle layer's o projection is the source's, rows = output channels as stored
    layer = manifest["config"]["num_hidden_layers"] // 2
    stored = open_array(scratch / "big/state/layers.attn.wo")
    source = SafetensorsIndex.from_dir(src).read(f"model.layers.{layer}.self_attn.o_proj.weight")
    np.testing.assert_array_equal(stored[layer].read().result(), source)


def test_killed_conversion_leaves_nothing_restorable_and_a_rerun_completes(scratch):
    src, dst = scratch / "hf", scratch / "converted"
    write_synthetic_hf_checkpoint(src, synthetic_hf_config(8))           # ~450 MB: a few seconds to convert
    proc = subprocess.Popen([*CONVERT, str(src), str(dst), "--quiet"], stderr=subprocess.DEVNULL)
    partial = scratch / f".converted.converting-{proc.pid}"
    deadline = time.monotonic() + 60
    while not any((partial / "state").glob("*/c/*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the conversion finished before it could be killed"

    assert not dst.exists() and partial.is_dir()
    assert checkpoint.is_converted_checkpoint(partial)
    with pytest.raises(CheckpointError, match="incomplete conversion .*complete: false.*rerun scripts/convert_hf.py"):
        checkpoint.restore_model(partial)
    with pytest.raises(CheckpointError, match="incomplete conversion"):
        Engine(model_path=str(partial))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpoint.restore_model(dst)

    rerun = subprocess.run([*CONVERT, str(src), str(dst), "--quiet"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removing the leftover of an interrupted conversion: {partial}" in rerun.stderr
    assert not partial.exists()
    model = checkpoint.restore_model(dst)
    assert model.cfg.num_layers == 8


# -- refusals -----------------------------------------------------------------------------------


def copy_converted(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted["bf16"], tmp_path / "copy"))


def test_conversion_refuses_a_source_missing_a_tensor_and_writes_nothing(hf_dirs, tmp_path):
    src = Path(shutil.copytree(hf_dirs["bf16"], tmp_path / "hf"))
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): model.layers.1.self_attn.k_proj.weight$"):
        checkpoint.convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_conversion_refuses_a_source_tensor_of_the_wrong_shape(hf_dirs, tmp_path):
    src = Path(shutil.copytree(hf_dirs["bf16"], tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"experts.0.w1.weight has shape \[32, 64\], expected \[48, 64\]"):
        checkpoint.convert(src, tmp_path / "out")


def test_restore_lists_missing_and_unexpected_tensors(converted, tmp_path):
    path = copy_converted(converted, tmp_path)
    shutil.move(path / "state/layers.attn.wqkv", path / "state/layers.attn.wqkv_old")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): layers.attn.wqkv; has 1 unexpected tensor\(s\): "
                                              r"layers.attn.wqkv_old$"):
        checkpoint.restore_model(path)


def test_restore_names_a_tensor_whose_shape_differs_from_the_manifest_config(converted, tmp_path):
    path = copy_converted(converted, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"]["intermediate_size"] = 48
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"tensor layers.experts.w13 has shape \[2, 8, 64, 2, 32\], "
                                              r"expected \[2, 8, 64, 2, 48\] \(and 1 more"):
        checkpoint.restore_model(path)


def test_restore_refuses_another_config_or_expert_format(converted):
    path = converted["bf16"]
    cfg = checkpoint.manifest_config(checkpoint.read_manifest(path))
    other = dataclasses.replace(cfg, num_experts_per_tok=4)
    with pytest.raises(CheckpointError, match=r"converted for another model config: num_experts_per_tok 2 "
                                              r"\(checkpoint\) != 4 \(requested\)$"):
        checkpoint.restore_model(path, config=other)
    with pytest.raises(CheckpointError, match="holds bf16 experts, fp8 were requested"):
        checkpoint.restore_model(path, expert_format="fp8")
    with pytest.raises(CheckpointError, match="holds bf16 experts, --quantization modelopt_fp4 asks for nvfp4"):
        Engine(model_path=str(path), quantization="modelopt_fp4")


def test_cli_refuses_to_overwrite_without_force_in_one_line(hf_dirs, converted, tmp_path):
    dst = copy_converted(converted, tmp_path)
    before = (dst / "manifest.json").read_bytes()
    out = subprocess.run([*CONVERT, str(hf_dirs["fp8"]), str(dst), "--quiet"], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr == f"convert_hf: error: {dst} already exists; pass --force to replace it\n"
    assert (dst / "manifest.json").read_bytes() == before
    checkpoint.convert(hf_dirs["fp8"], dst, force=True)
    assert checkpoint.read_manifest(dst)["expert_format"] == "fp8"
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]          # no temporary or replaced leftovers


def test_disk_full_during_conversion_removes_the_partial_output(hf_dirs, tmp_path, monkeypatch):
    def full(self, key, value, layer=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.ArrayWriter, "write", full)
    with pytest.raises(CheckpointError, match=r"disk full while writing .*out .*removed the partial output"):
        checkpoint.convert(hf_dirs["bf16"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_conversion_refuses_up_front_when_the_disk_is_too_small(hf_dirs, tmp_path, monkeypatch):
    almost_full = SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: almost_full)
    with pytest.raises(CheckpointError, match=r"not enough disk space for .*out: the checkpoint needs \d+\.\d kB, "
                                              r"1\.0 kB free"):
        checkpoint.convert(hf_dirs["bf16"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_model_round_trips_an_in_memory_model(hf_dirs, tmp_path):
    model = load_model(hf_dirs["nvfp4"], jnp.bfloat16, quantization="modelopt_fp4")
    checkpoint.save_model(model, tmp_path / "saved")
    assert_same_parameters(checkpoint.restore_model(tmp_path / "saved", jnp.bfloat16), model)
