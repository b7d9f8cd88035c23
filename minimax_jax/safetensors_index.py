"""Reads the headers and tensors of a safetensors checkpoint directory, memory-mapped.

The `safetensors` package writes our test checkpoints, but its numpy and flax readers cannot
return float8_e4m3fn tensors, which the released MiniMax-M2.5 checkpoint is made of. The format
is simple (u64 header length, JSON header, raw little-endian data), so tensors are read here as
zero-copy numpy views of an mmap, with ml_dtypes for bf16 and fp8. Every header is validated
before anything is read, so a truncated or malformed file fails before any loading starts.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with a one-line reason."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int      # absolute byte offset in the file
    end: int


class SafetensorsIndex:
    """name -> TensorInfo over every safetensors file of a checkpoint directory."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors
        self._maps: dict[Path, mmap.mmap] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> "SafetensorsIndex":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"no such checkpoint directory: {path}")
        if not path.is_dir():
            raise CheckpointError(f"checkpoint path is not a directory: {path}")
        files = _checkpoint_files(path)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name} appears in both {tensors[name].file.name} and {file.name}")
                tensors[name] = info
        return cls(tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes (pages are read on first touch)."""
        info = self.tensors[name]
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = np.dtype(DTYPES[info.dtype])
        count = int(np.prod(info.shape, dtype=np.int64))
        return np.frombuffer(mm, dtype=dtype, count=count, offset=info.begin).reshape(info.shape)

    def close(self) -> None:
        self._maps.clear()   # views may still reference the maps; let GC close them


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index.name} names files that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    return files


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parses and validates one file's header against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"{file} is truncated: header needs {8 + header_len} bytes, file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{file.name}: tensor {name} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{file.name}: tensor {name} spans {end - begin} bytes, its shape needs {expected}")
        if base + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name} ends at byte {base + end}, file has {size}")
        out[name] = TensorInfo(file, dtype, shape, base + begin, base + end)
    return out
