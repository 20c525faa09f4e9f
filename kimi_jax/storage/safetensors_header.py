"""Safetensors shard headers: parsed without touching tensor bytes, and written for the synthesizer.

A shard is ``u64 little-endian header length N`` + ``N bytes of JSON`` + tensor data. Each JSON
entry gives dtype, shape and ``data_offsets`` relative to the end of the header. We parse the
header ourselves (rather than through ``safe_open``) because we need absolute byte offsets for
positioned reads, and because a corrupted or truncated shard must be reported precisely.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from kimi_jax.errors import CheckpointError
from kimi_jax.fileio import open_regular, parse_json

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip

NUMPY_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}  # fmt: skip

SAFETENSORS_DTYPE = {v: k for k, v in NUMPY_DTYPES.items()}

# A real Kimi K2.5 MoE shard header is about 0.5 MB; anything this large is corruption.
MAX_HEADER_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor in one shard, located by absolute byte offset in the file."""

    stored_name: str
    shard: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]

    def rows(self, start: int, stop: int) -> "TensorRecord":
        """Rows ``start:stop`` of this C-order tensor: one contiguous byte range of its shard."""
        row = self.nbytes // self.shape[0]
        return dataclasses.replace(self, offset=self.offset + start * row, nbytes=(stop - start) * row,
                                   shape=(stop - start, *self.shape[1:]))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ShardHeader:
    path: Path
    file_size: int
    data_start: int
    data_end: int  # absolute offset of the last tensor byte + 1
    tensors: tuple[TensorRecord, ...]
    metadata: dict[str, str]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse one local shard's header (a regular file only); reject truncation and inconsistent
    entries, naming the tensor (:func:`parse_shard_header`, which remote shards go through too)."""
    fd = open_regular(path, "shard", CheckpointError)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = header_length(path, f.read(8), size)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read shard header ({e.strerror or e})") from None
    return parse_shard_header(path, raw, size)


def header_length(path: Path, prefix: bytes, size: int) -> int:
    """The JSON header's byte count from a shard's first 8 bytes; rejects an impossible one."""
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: shard is truncated: {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path}: corrupted safetensors header: declares a {n}-byte header in a {size}-byte file")
    return n


def parse_shard_header(path: Path, raw: bytes, size: int) -> ShardHeader:
    """Parse the JSON header ``raw`` (the bytes after the 8-byte length) of a ``size``-byte shard.
    ``path`` names the shard in errors and records; it need not exist locally (remote shards).

    As the safetensors format requires, the tensors must tile the data section exactly: no
    overlaps, no gaps, nothing past its end (an overlap would let two tensors share bytes and
    silently change what is computed)."""
    header = parse_json(raw, f"{path}: corrupted safetensors header", CheckpointError,
                        object_pairs_hook=_unique_keys)  # fmt: skip
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header: expected a JSON object")

    data_start = 8 + len(raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupted safetensors header: __metadata__ must map strings to strings")
    spans = sorted((_parse_entry(path, name, entry), name) for name, entry in header.items())
    data_size = size - data_start
    cursor, previous = 0, None
    for (begin, end, _), name in spans:
        if begin < cursor:
            raise CheckpointError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] overlap tensor "
                                  f"{previous!r}, which ends at {cursor}; tensors may not share bytes")  # fmt: skip
        if begin > cursor:
            after = f"after tensor {previous!r}" if previous else "at the start of the data section"
            raise CheckpointError(f"{path}: bytes [{cursor}, {begin}) of the data section belong to no tensor "
                                  f"({after}, before {name!r}); safetensors tensors must be contiguous")  # fmt: skip
        if end > data_size:
            raise CheckpointError(f"{path}: shard is truncated or its offsets are corrupt: tensor {name!r} "
                                  f"data_offsets [{begin}, {end}] end at byte {data_start + end} of the file, which "
                                  f"has {size} bytes")  # fmt: skip
        cursor, previous = end, name
    if cursor != data_size:
        raise CheckpointError(f"{path}: {data_size - cursor} bytes after the last tensor"
                              f"{f' ({previous!r})' if previous else ''} belong to no tensor; the header's tensors "
                              f"end at byte {data_start + cursor} of a {size}-byte file")  # fmt: skip
    records = [TensorRecord(name, path, data_start + begin, end - begin, rec[0], rec[1])
               for (begin, end, rec), name in spans]  # fmt: skip
    return ShardHeader(path, size, data_start, data_start + cursor, tuple(records), dict(metadata))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, entry: Any) -> tuple[int, int, tuple[str, tuple[int, ...]]]:
    """``(begin, end, (dtype, shape))`` of one header entry, offsets relative to the data section."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: corrupted header entry, expected dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r}; expected one of {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: corrupted shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: corrupted data_offsets {offsets!r}; expected [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: corrupted data_offsets {offsets}; expected 0 <= begin <= end")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype}{shape} needs {expected}"
        )
    return begin, end, (dtype, tuple(shape))


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: ``data`` is an array, or None to leave its bytes as a file hole; an array
    with fewer rows than ``shape`` fills the leading rows and leaves the rest a hole."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | None = None


def write_shard(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors shard in the given tensor order; returns the tensor-data byte count.

    Tensors without data are left as holes (the file is extended with ``truncate``), which is
    how the full-shape Kimi layout fits on a small disk.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    cursor = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        start = f.tell()
        for t in tensors:
            nbytes = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
            if t.data is None:
                f.seek(nbytes, os.SEEK_CUR)
                continue
            arr = np.ascontiguousarray(t.data)
            leading = arr.ndim == len(t.shape) and arr.ndim > 0 and arr.shape[1:] == t.shape[1:] and arr.shape[0] <= t.shape[0]
            if arr.dtype != NUMPY_DTYPES[t.dtype] or not leading:
                raise ValueError(f"{t.name}: data is {arr.dtype}{arr.shape}, planned {t.dtype}{t.shape}")
            f.write(arr.tobytes())
            f.seek(nbytes - arr.nbytes, os.SEEK_CUR)
        f.truncate(start + cursor)
    return cursor
