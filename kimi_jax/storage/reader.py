"""Positioned byte-range reads of exactly the tensors asked for, with every byte counted.

Reads go through ``os.preadv`` straight into numpy buffers; tensors that lie back to back in a
shard are fetched with one call. Counters are kept per tensor, per layer and per step, under a
lock so the prefetch thread can read while the main thread computes. Transient I/O errors are
retried with exponential backoff; a persistent one names shard, tensor and offset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import mmap
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from kimi_jax.errors import StorageError
from kimi_jax.fileio import open_regular
from kimi_jax.storage.checkpoint import WeightEntry
from kimi_jax.storage.safetensors_header import TensorRecord

TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY}


@dataclasses.dataclass
class ReadCounters:
    """Bytes read, keyed three ways. ``layer`` is None for the embedding and the head."""

    total: int = 0
    calls: int = 0
    seconds: float = 0.0
    per_tensor: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    per_layer: dict[int | None, int] = dataclasses.field(default_factory=lambda: defaultdict(int))

    def snapshot(self) -> "ReadCounters":
        return ReadCounters(self.total, self.calls, self.seconds, dict(self.per_tensor), dict(self.per_layer))


class ShardReader:
    """Reads tensors from the shards of one checkpoint. Use as a context manager."""

    def __init__(self, retries: int = 3, backoff_s: float = 0.05):
        self.retries = retries
        self.backoff_s = backoff_s
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.run = ReadCounters()
        self.step = ReadCounters()
        # When a list: every positioned read appends (shard, offset, nbytes, seconds); benchmarks use it.
        self.trace: list[tuple[Path, int, int, float]] | None = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def begin_step(self) -> None:
        with self._lock:
            self.step = ReadCounters()

    def end_step(self) -> ReadCounters:
        with self._lock:
            return self.step.snapshot()

    # -- reading -----------------------------------------------------------------------------

    def read_weights(self, weights: Iterable[WeightEntry], layer: int | None) -> dict[str, dict[str, np.ndarray]]:
        """Read every stored part of each weight; returns ``{weight name: {part: array}}``."""
        wanted = [(w.name, part, rec) for w in weights for part, rec in w.parts.items()]
        arrays = self.read_records([rec for _, _, rec in wanted], layer=layer, labels=[f"{n}:{p}" for n, p, _ in wanted])
        out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        for (name, part, _), arr in zip(wanted, arrays):
            out[name][part] = arr
        return dict(out)

    def read_records(self, records: list[TensorRecord], layer: int | None, labels: list[str] | None = None) -> list[np.ndarray]:
        """Read tensors, merging runs that are contiguous in one shard into single reads."""
        labels = labels or [r.stored_name for r in records]
        order = sorted(range(len(records)), key=lambda i: (str(records[i].shard), records[i].offset))
        results: list[np.ndarray | None] = [None] * len(records)
        i = 0
        while i < len(order):
            j = i + 1
            first = records[order[i]]
            end = first.offset + first.nbytes
            while j < len(order):
                nxt = records[order[j]]
                if nxt.shard != first.shard or nxt.offset != end:
                    break
                end += nxt.nbytes
                j += 1
            buf = self._read_range(first.shard, first.offset, end - first.offset, first.stored_name)
            for k in order[i:j]:
                rec = records[k]
                start = rec.offset - first.offset
                raw = buf[start : start + rec.nbytes]
                results[k] = raw.view(rec.numpy_dtype).reshape(rec.shape)
            self._count([(labels[k], records[k].nbytes) for k in order[i:j]], layer)
            i = j
        return results  # type: ignore[return-value]

    def _count(self, items: list[tuple[str, int]], layer: int | None) -> None:
        with self._lock:
            for counters in (self.run, self.step):
                counters.calls += 1
                for label, n in items:
                    counters.total += n
                    counters.per_tensor[label] += n
                    counters.per_layer[layer] += n

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = open_regular(path, "shard", StorageError)
                self._fds[path] = fd
            return fd

    def _pread(self, fd: int, view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)

    def _read_range(self, shard: Path, offset: int, nbytes: int, tensor: str) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(buf)
        fd = self._fd(shard)
        done, attempt = 0, 0
        started = time.perf_counter()
        while done < nbytes:
            try:
                got = self._pread(fd, view[done:], offset + done)
            except OSError as e:
                if e.errno in TRANSIENT_ERRNOS and attempt < self.retries:
                    attempt += 1
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                raise StorageError(
                    f"{shard}: reading tensor {tensor!r} at offset {offset + done} failed after "
                    f"{attempt + 1} attempt(s): {e.strerror or e}"
                ) from None
            if got == 0:
                raise StorageError(
                    f"{shard}: unexpected end of file reading tensor {tensor!r} at offset {offset + done} "
                    f"({nbytes - done} of {nbytes} bytes missing); the shard is truncated"
                )
            done += got
            attempt = 0  # retries count consecutive failures; progress resets them
        elapsed = time.perf_counter() - started
        with self._lock:
            self.run.seconds += elapsed
            self.step.seconds += elapsed
            if self.trace is not None:
                self.trace.append((shard, offset, nbytes, elapsed))
        return buf


# -- page cache ---------------------------------------------------------------------------------


def evict_page_cache(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop these files from the page cache, so the next reads are cold."""
    for path in paths:
        fd = open_regular(path, "shard", StorageError)
        try:
            # Dirty pages (a freshly written shard) are not dropped, so flush them first.
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = libc
    return _libc


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` currently in the page cache (``mincore`` over a read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = _load_libc()
    fd = open_regular(path, "shard", StorageError)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise StorageError(f"{path}: mmap for page-cache residency failed (errno {ctypes.get_errno()})")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise StorageError(f"{path}: mincore failed (errno {ctypes.get_errno()})")
            resident = int(np.frombuffer(vec, dtype=np.uint8).__and__(1).sum())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * mmap.PAGESIZE, size)
