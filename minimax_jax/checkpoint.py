"""Converted checkpoints: the model's parameter tree as an orbax checkpoint, restorable onto any mesh.

Layout of a converted checkpoint directory (docs/checkpoints.md):

    manifest.json   what was converted and how; "complete": true is written last
    state/          an orbax PyTree checkpoint (non-OCDBT, zarr3), one array per parameter, named
                    like orbax names it ("layers.attn.wqkv"); stacked [layers, ...] parameters are
                    chunked one layer per file, split into small inner chunks (zarr3 sharding)
    tokenizer.json, tokenizer_config.json, ...   copied from the source directory

orbax 0.12.8 writes a jax.Array only whole (its partial save adds leaves, it never fills part of
one), so conversion writes the zarr3 arrays with tensorstore one layer slice at a time, in the
format orbax writes itself, plus orbax's `_METADATA`. Restoring is plain orbax
(`PyTreeCheckpointHandler` with `ArrayRestoreArgs`): every device reads only the chunks of its
own shard, on whatever sharding the caller asks for.

Conversion writes into a temporary sibling directory `.<name>.converting-<pid>` and renames it to
the destination once `manifest.json` says complete, so an interrupted conversion never looks like
a checkpoint; the next conversion to the same destination removes such leftovers of dead runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from minimax_jax.config import ModelConfig
from minimax_jax.loader import QUANTIZATION_TO_FORMAT, CheckpointLayout, detect_quantization
from minimax_jax.model import EXPERT_FORMATS, MiniMaxM2
from minimax_jax.safetensors_index import CheckpointError, SafetensorsIndex
from sharding.mesh import Layout, make_mesh
from sharding.specs import KV_HEAD_KEYS, param_spec

log = logging.getLogger(__name__)

FORMAT = "minimax-jax-orbax"
# 2: attention beside FP8 experts held as FP8 blocks (model.attention_format); 3: bf16 attention
# as wqkv (rows grouped by KV head) and wo, rows = output channels, where it was wq, wk, wv, wo
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
STATE_DIR = "state"
PARTIAL_TAG = ".converting-"
INNER_CHUNK_BYTES = 4 << 20      # inner (read) chunk target; outer chunks are one layer
MAX_SPLIT = 64                   # sharded axes are chunked at least this finely, when they divide
NOT_COPIED = {"config.json", "model.safetensors.index.json", "hf_quant_config.json"}
MAX_COPIED_FILE_BYTES = 64 << 20

Key = tuple[str, ...]
Shardings = Callable[[Key, Any], jax.sharding.Sharding]


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: Key
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def name(self) -> str:
        return ".".join(self.key)

    @property
    def stacked(self) -> bool:
        return self.key[0] == "layers"

    @property
    def write_shape(self) -> tuple[int, ...]:
        """The outer chunk, written at once: one layer of a stacked parameter, else all of it."""
        return (1, *self.shape[1:]) if self.stacked else self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# -- the parameter tree ----------------------------------------------------------------------


def abstract_model(cfg: ModelConfig, dtype: Any, expert_format: str) -> tuple[nnx.GraphDef, nnx.State]:
    """MiniMaxM2's graphdef and state of ShapeDtypeStructs (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: MiniMaxM2(cfg, dtype=dtype, expert_format=expert_format, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _variables(state: nnx.State) -> list[tuple[Key, Any]]:
    return [(tuple(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def model_leaves(cfg: ModelConfig, dtype: Any, expert_format: str) -> list[Leaf]:
    """Every parameter of the model: path, shape, dtype."""
    _, state = abstract_model(cfg, dtype, expert_format)
    return [Leaf(key, tuple(var.shape), np.dtype(var.dtype)) for key, var in _variables(state)]


# -- manifest --------------------------------------------------------------------------------


def is_converted_checkpoint(path: str | Path) -> bool:
    """True for a converted checkpoint directory, complete or not (an HF directory is False)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).exists() or (path / STATE_DIR).is_dir())


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete converted checkpoint; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {path}")
    rerun = "the conversion was interrupted or is still running; rerun scripts/convert_hf.py"
    file = path / MANIFEST
    if not file.exists():
        raise CheckpointError(f"{path} is not a complete converted checkpoint (no {MANIFEST}): {rerun}")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} describes format {manifest.get('format')!r} version "
                              f"{manifest.get('format_version')!r}; this code reads {FORMAT!r} "
                              f"version {FORMAT_VERSION}: convert the HF checkpoint again (scripts/convert_hf.py)")
    if manifest.get("complete") is not True:
        raise CheckpointError(f"{path} is an incomplete conversion ({MANIFEST} says complete: false): {rerun}")
    return manifest


def manifest_config(manifest: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_hf(manifest["config"])


def _config_dict(cfg: ModelConfig) -> dict[str, Any]:
    # to_hf() leaves routed_scaling_factor out; keep it so from_hf(...) gives back `cfg` exactly
    out = {**cfg.to_hf(), "routed_scaling_factor": cfg.routed_scaling_factor}
    if ModelConfig.from_hf(out) != cfg:
        raise AssertionError(f"config does not survive to_hf/from_hf: {cfg}")
    return out


def _config_differences(found: ModelConfig, wanted: ModelConfig) -> str:
    diffs = [f"{f.name} {getattr(found, f.name)!r} (checkpoint) != {getattr(wanted, f.name)!r} (requested)"
             for f in dataclasses.fields(ModelConfig) if getattr(found, f.name) != getattr(wanted, f.name)]
    return ", ".join(diffs)


def _manifest(cfg: ModelConfig, dtype: Any, expert_format: str, leaves: list[Leaf],
              source: dict[str, Any], complete: bool) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": complete,
        "config": _config_dict(cfg), "dtype": np.dtype(dtype).name, "expert_format": expert_format,
        "tensor_count": len(leaves), "total_bytes": sum(leaf.nbytes for leaf in leaves),
        "parameters": {leaf.name: {"shape": list(leaf.shape), "dtype": leaf.dtype.name} for leaf in leaves},
        "orbax": {"directory": STATE_DIR, "use_ocdbt": False, "use_zarr3": True, "outer_chunk": "one layer"},
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json(file: Path, value: Any) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, file)


# -- writing ---------------------------------------------------------------------------------


def _shardable_axes(leaf: Leaf) -> set[int]:
    """Axes that some layout splits over devices (from sharding.specs)."""
    axes = set()
    abstract = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    for moe in ("ep", "tp"):
        spec = param_spec(leaf.key, abstract, Layout(moe=moe))
        axes |= {axis for axis, name in enumerate(spec) if name is not None}
    return axes


def inner_chunk_shape(leaf: Leaf, target_bytes: int = INNER_CHUNK_BYTES) -> tuple[int, ...]:
    """Read granularity within a layer. A slice over target_bytes is split: the axes a layout
    shards down to 1/MAX_SPLIT (so shards over a power-of-two device count up to MAX_SPLIT start
    and end on chunk boundaries), then the largest axes until a chunk is <= target_bytes."""
    chunk = list(leaf.write_shape)
    nbytes = lambda: math.prod(chunk) * leaf.dtype.itemsize
    if nbytes() <= target_bytes:
        return tuple(chunk)
    for axis in sorted(_shardable_axes(leaf)):
        while chunk[axis] % 2 == 0 and leaf.shape[axis] // chunk[axis] < MAX_SPLIT:
            chunk[axis] //= 2
    while nbytes() > target_bytes:
        even = [a for a in range(len(chunk)) if chunk[a] % 2 == 0]
        if not even:
            break
        chunk[max(even, key=lambda a: chunk[a])] //= 2
    return tuple(chunk)


def _zarr3_spec(directory: Path, leaf: Leaf) -> dict[str, Any]:
    """orbax's own zarr3 array format (sharding_indexed, uncompressed): one outer chunk per layer."""
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(directory / leaf.name)},
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": list(leaf.shape), "data_type": leaf.dtype.name, "fill_value": 0,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(leaf.write_shape)}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(inner_chunk_shape(leaf)), "codecs": [little],
                "index_codecs": [little, {"name": "crc32c"}], "index_location": "end"}}],
        },
    }


def _pytree_metadata(leaves: list[Leaf]) -> dict[str, Any]:
    """orbax's `_METADATA` for a tree of dicts of jax.Arrays (PyTreeCheckpointHandler format)."""
    tree = {}
    for leaf in leaves:
        tree[str(leaf.key)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in leaf.key],       # 2: dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": list(leaf.write_shape)}}
    return {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


def _array_metadatas(leaves: list[Leaf]) -> dict[str, Any]:
    """orbax's `array_metadatas/process_0`: each array's write (outer) and read (inner) chunks."""
    return {"array_metadatas": [{"array_metadata": {
        "param_name": leaf.name, "write_shape": list(leaf.write_shape),
        "chunk_shape": list(inner_chunk_shape(leaf)), "ext_metadata": None}} for leaf in leaves]}


class ArrayWriter:
    """The parameter arrays of a checkpoint being written, filled whole or one layer at a time."""

    def __init__(self, state_dir: Path, leaves: list[Leaf], progress: tqdm | None = None):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.leaves = {leaf.key: leaf for leaf in leaves}
        self.progress = progress
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self.arrays = {leaf.key: ts.open(_zarr3_spec(state_dir, leaf), create=True, context=context).result()
                       for leaf in leaves}

    def write(self, key: Key, value: np.ndarray, layer: int | None = None) -> None:
        leaf = self.leaves[key]
        expected = leaf.shape[1:] if layer is not None else leaf.shape
        if tuple(value.shape) != expected:
            where = f" layer {layer}" if layer is not None else ""
            raise CheckpointError(f"tensor {leaf.name}{where} has shape {list(value.shape)}, expected {list(expected)}")
        target = self.arrays[key] if layer is None else self.arrays[key][layer]
        target.write(np.asarray(value, dtype=leaf.dtype)).result()
        if self.progress is not None:
            self.progress.update(value.size * leaf.dtype.itemsize)


def _is_disk_full(e: BaseException) -> bool:
    # tensorstore reports ENOSPC as ValueError("... No space left on device [os_error_code='28']")
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                # an unreaped (killed) child is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_partials(dst: Path) -> list[Path]:
    """Deletes `.<name>.converting-<pid>` leftovers of dead conversions to dst; refuses if one
    is still running."""
    removed = []
    for partial in dst.parent.glob(f".{dst.name}{PARTIAL_TAG}*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            raise CheckpointError(f"another conversion to {dst} is running (pid {pid}, writing {partial})")
        log.warning("removing the leftover of an interrupted conversion: %s", partial)
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def _check_destination(dst: Path, force: bool, sources: Iterable[Path] = ()) -> None:
    for src in sources:
        src = src.resolve()
        if src == dst.resolve() or dst.resolve() in src.parents:
            raise CheckpointError(f"destination {dst} would overwrite the source {src}")
    if not dst.exists():
        return
    if not force:
        raise CheckpointError(f"{dst} already exists; pass --force to replace it")
    if not dst.is_dir() or not (is_converted_checkpoint(dst) or not any(dst.iterdir())):
        raise CheckpointError(f"refusing to replace {dst}: it is not a converted checkpoint")


def _check_disk_space(dst: Path, nbytes: int) -> None:
    free = shutil.disk_usage(dst.parent).free
    if free < nbytes:
        raise CheckpointError(f"not enough disk space for {dst}: the checkpoint needs {format_size(nbytes)}, "
                              f"{format_size(free)} free")


def format_size(nbytes: float) -> str:
    """1.23 GB, 45.60 MB, 7.8 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{1 if unit == 'kB' else 2}f} {unit}"
    return f"{int(nbytes)} B"


def _write_checkpoint(dst: Path, leaves: list[Leaf], manifest: dict[str, Any], force: bool,
                      fill: Callable[[ArrayWriter], None], copy_files: Iterable[Path] = (),
                      progress: bool = False) -> dict[str, Any]:
    """Writes a checkpoint into a temporary sibling, then renames it to dst once complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)
    _check_disk_space(dst, manifest["total_bytes"])
    tmp = dst.parent / f".{dst.name}{PARTIAL_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_json(tmp / MANIFEST, {**manifest, "complete": False})
        with tqdm(total=manifest["total_bytes"], unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"writing {dst.name}", disable=not progress, mininterval=0.5) as bar:
            fill(ArrayWriter(tmp / STATE_DIR, leaves, bar))
        _write_json(tmp / STATE_DIR / "_METADATA", _pytree_metadata(leaves))
        (tmp / STATE_DIR / "array_metadatas").mkdir()
        _write_json(tmp / STATE_DIR / "array_metadatas" / "process_0", _array_metadatas(leaves))
        for file in copy_files:
            shutil.copy2(file, tmp / file.name)
        _write_json(tmp / MANIFEST, {**manifest, "complete": True})
        _replace(tmp, dst, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise CheckpointError(f"disk full while writing {dst} (needs {format_size(manifest['total_bytes'])}); "
                                  f"removed the partial output {tmp}") from None
        raise
    return {**manifest, "complete": True}


def _replace(tmp: Path, dst: Path, force: bool) -> None:
    if not dst.exists():
        tmp.rename(dst)
        return
    _check_destination(dst, force)
    old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- HF -> converted -------------------------------------------------------------------------


def convert(src: str | Path, dst: str | Path, dtype: Any = jnp.bfloat16, expert_format: str | None = None,
            force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Converts an HF checkpoint directory (bf16, FP8 release, ModelOpt NVFP4) into a converted
    checkpoint at dst, streaming one layer at a time. expert_format None keeps the source's.
    Returns the manifest."""
    src, dst = Path(src), Path(dst)
    _check_destination(dst, force, sources=[src])
    cfg = ModelConfig.from_pretrained(src)
    index = SafetensorsIndex.from_dir(src)
    source = CheckpointLayout(cfg, index)
    quantization = detect_quantization(src)
    expert_format = expert_format or QUANTIZATION_TO_FORMAT[quantization]
    if expert_format not in EXPERT_FORMATS:
        raise CheckpointError(f"expert format must be one of {', '.join(EXPERT_FORMATS)}, got {expert_format!r}")
    source.check()
    leaves = model_leaves(cfg, dtype, expert_format)
    files = sorted({info.file for info in index.tensors.values()} | {src / "config.json"})
    copied = [f for f in sorted(src.iterdir()) if f.is_file() and f.suffix != ".safetensors"
              and f.name not in NOT_COPIED and f.stat().st_size <= MAX_COPIED_FILE_BYTES]
    info = {"path": str(src.resolve()), "quantization": quantization,
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
            "copied_files": [f.name for f in copied]}
    manifest = _manifest(cfg, dtype, expert_format, leaves, info, complete=False)
    start = time.perf_counter()
    fill = lambda writer: _fill_from_hf(writer, source, leaves, dtype, expert_format)
    manifest = _write_checkpoint(dst, leaves, manifest, force, fill, copied, progress)
    log.info("converted %s -> %s (%d tensors, %s) in %.1f s", src, dst, len(leaves),
             format_size(manifest["total_bytes"]), time.perf_counter() - start)
    return manifest


def _fill_from_hf(writer: ArrayWriter, source: CheckpointLayout, leaves: list[Leaf], dtype: Any,
                  expert_format: str) -> None:
    for leaf in leaves:
        if not leaf.stacked:
            name, _ = source.top_tensors()[leaf.key]
            value = source.read(name, leaf.dtype)
            writer.write(leaf.key, value.T if leaf.key == ("lm_head",) else value)
            del value
            source.index.close()
    for layer in range(source.cfg.num_layers):
        values = source.layer_values(layer, dtype, expert_format)
        for leaf in leaves:
            if leaf.stacked:
                writer.write(leaf.key, values.pop(leaf.key[1:]), layer)
        del values
        # drop the source's mmaps: pages touched so far would otherwise stay in our RSS
        source.index.close()


# -- in-memory model -> converted ------------------------------------------------------------


def save_model(model: MiniMaxM2, path: str | Path, force: bool = False) -> dict[str, Any]:
    """Writes a model held in memory (small models: each parameter is gathered to the host)."""
    path = Path(path)
    _check_destination(path, force)
    _, state = nnx.split(model)
    variables = _variables(state)
    leaves = [Leaf(key, tuple(var.shape), np.dtype(var.dtype)) for key, var in variables]
    manifest = _manifest(model.cfg, model.dtype, model.expert_format, leaves,
                         {"path": None, "quantization": None, "files": [], "copied_files": []}, complete=False)

    def fill(writer: ArrayWriter) -> None:
        for key, var in variables:
            writer.write(key, np.asarray(jax.device_get(var[...])))

    return _write_checkpoint(path, leaves, manifest, force, fill)


# -- converted -> model ----------------------------------------------------------------------


def _stored_arrays(state_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every zarr3 array in the orbax directory."""
    out = {}
    for meta in state_dir.glob("*/zarr.json"):
        try:
            info = json.loads(meta.read_text())
            out[meta.parent.name] = (tuple(info["shape"]), info["data_type"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{meta} is not valid zarr3 metadata: {e}") from None
    return out


def _castable(stored: str, wanted: np.dtype) -> bool:
    """Compute-dtype parameters may be restored in another float dtype; quantised ones may not."""
    stored = np.dtype(jnp.dtype(stored))
    if stored == wanted:
        return True
    wide_float = lambda d: jnp.issubdtype(d, jnp.floating) and d.itemsize >= 2
    return wide_float(stored) and wide_float(wanted)


def check_arrays(leaves: list[Leaf], stored: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """One line on missing or unexpected tensors, a wrong shape, or a dtype that cannot be cast."""
    names = {leaf.name for leaf in leaves}
    missing = [leaf.name for leaf in leaves if leaf.name not in stored]
    extra = sorted(set(stored) - names)
    if missing or extra:
        parts = ([f"lacks {len(missing)} tensor(s): {_listing(missing)}"] if missing else []) + \
                ([f"has {len(extra)} unexpected tensor(s): {_listing(extra)}"] if extra else [])
        raise CheckpointError("converted checkpoint " + "; ".join(parts))
    wrong = [(leaf, stored[leaf.name][0]) for leaf in leaves if stored[leaf.name][0] != leaf.shape]
    if wrong:
        leaf, shape = wrong[0]
        more = f" (and {len(wrong) - 1} more mismatched tensor(s))" if len(wrong) > 1 else ""
        raise CheckpointError(f"tensor {leaf.name} has shape {list(shape)}, expected {list(leaf.shape)}{more}")
    for leaf in leaves:
        if not _castable(stored[leaf.name][1], leaf.dtype):
            raise CheckpointError(f"tensor {leaf.name} is stored as {stored[leaf.name][1]}, expected {leaf.dtype.name}")


def _listing(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" ... and {len(names) - shown} more" if len(names) > shown else "")


def restore_model(path: str | Path, dtype: Any = jnp.bfloat16, shardings: Shardings | None = None, *,
                  expert_format: str | None = None, config: ModelConfig | None = None) -> MiniMaxM2:
    """Restores a converted checkpoint; each device reads only the chunks of its shards.

    dtype: the compute dtype (dense weights stored in another float dtype are cast while read).
    shardings(key, abstract_leaf) gives each parameter's jax Sharding (key like
    ('layers', 'attn', 'wqkv'), abstract_leaf a ShapeDtypeStruct), as for loader.load_model;
    None puts everything on the default device. expert_format / config, when given, must be
    what the checkpoint was converted for.
    """
    path = Path(path)
    manifest = read_manifest(path)
    cfg, stored_format = manifest_config(manifest), manifest["expert_format"]
    if config is not None and config != cfg:
        raise CheckpointError(f"{path} was converted for another model config: {_config_differences(cfg, config)}")
    if expert_format is not None and expert_format != stored_format:
        raise CheckpointError(f"{path} holds {stored_format} experts, {expert_format} were requested; "
                              f"convert again with --expert-format {expert_format}")
    state_dir = path / STATE_DIR
    if not (state_dir / "_METADATA").exists():
        raise CheckpointError(f"{path} is not a complete converted checkpoint: {state_dir / '_METADATA'} is missing")
    graphdef, state = abstract_model(cfg, dtype, stored_format)
    variables = _variables(state)
    leaves = [Leaf(key, tuple(var.shape), np.dtype(var.dtype)) for key, var in variables]
    check_arrays(leaves, _stored_arrays(state_dir))
    item, args = _restore_targets(leaves, shardings)
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
    for key, var in variables:
        var.set_value(_get(restored, key))
    return nnx.merge(graphdef, state)


def _restore_targets(leaves: list[Leaf], shardings: Shardings | None) -> tuple[dict, dict]:
    """orbax's target tree (sharded ShapeDtypeStructs) and its ArrayRestoreArgs tree."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item, args = {}, {}
    for leaf in leaves:
        abstract = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        sharding = shardings(leaf.key, abstract) if shardings else default
        _nest(item, leaf.key, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
        _nest(args, leaf.key, ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype))
    return item, args


def _nest(tree: dict, key: Key, value: Any) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _get(tree: dict, key: Key) -> Any:
    for k in key:
        tree = tree[k]
    return tree


# -- engine layouts --------------------------------------------------------------------------


def layout_shardings(layout: Layout, cfg: ModelConfig, devices: list | None = None) -> Shardings:
    """The shardings ModelRunner places each parameter with (sharding.specs), so that its
    shard_state finds them in place. Where tp exceeds the KV heads, the leaves of KV heads come
    replicated: shard_state copies their heads first, which changes their shapes."""
    mesh = make_mesh(layout, devices)
    replicate_kv = layout.kv_head_replicas(cfg.num_kv_heads) > 1

    def sharding(key: Key, leaf: Any) -> NamedSharding:
        if replicate_kv and key in KV_HEAD_KEYS:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(key, leaf, layout))
    return sharding


def restore_for_engine(path: str | Path, dtype: Any, args: Any) -> tuple[MiniMaxM2, str]:
    """Restores onto the layout the engine will run (args: EngineArgs); returns the model and
    a description of what was loaded."""
    manifest = read_manifest(path)
    cfg, stored_format = manifest_config(manifest), manifest["expert_format"]
    if args.quantization is not None and QUANTIZATION_TO_FORMAT[args.quantization] != stored_format:
        raise CheckpointError(f"{path} holds {stored_format} experts, --quantization {args.quantization} asks for "
                              f"{QUANTIZATION_TO_FORMAT[args.quantization]}; convert again with "
                              f"--expert-format {QUANTIZATION_TO_FORMAT[args.quantization]}")
    overrides = getattr(args, "json_model_override_args", None)
    requested = ModelConfig.from_hf({**manifest["config"], **json.loads(overrides)}) if overrides else cfg
    layout = Layout.from_sglang(args.tp_size, args.dp_size, args.ep_size, args.enable_dp_attention, cfg.num_experts)
    layout.check(cfg, stored_format)
    start = time.perf_counter()
    model = restore_model(path, dtype, layout_shardings(layout, cfg), expert_format=stored_format, config=requested)
    log.info("restored %s onto dp=%d x tp=%d in %.2f s", path, layout.dp, layout.tp, time.perf_counter() - start)
    return model, f"converted checkpoint {path} ({stored_format} experts, stored {manifest['dtype']})"
