"""Positioned byte-range reads of exactly the tensors asked for, with every byte counted.

Reads go through ``os.preadv`` straight into numpy buffers; tensors that lie back to back in a
shard are fetched with one call. Counters are kept per tensor, per layer and per step, under a
lock so the prefetch thread can read while the main thread computes. Transient I/O errors are
retried with exponential backoff; a persistent one names shard, tensor and offset.

Given a :class:`~kimi_jax.storage.digests.DigestTable`, every tensor read is hashed and checked
against it before it is returned; a mismatch names shard, tensor and offset. A remote checkpoint
is read by a subclass (:mod:`kimi_jax.storage.remote_reader`) that replaces only :meth:`ShardReader._fetch`.
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

import blake3
import numpy as np

from kimi_jax.errors import StorageError
from kimi_jax.fileio import open_regular
from kimi_jax.storage.checkpoint import WeightEntry
from kimi_jax.storage.digests import DigestTable, weights_digest
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
    network: int = 0  # of ``total``, bytes that came over the network (remote checkpoints)
    cache: int = 0  # of ``total``, bytes served by the local range cache (remote checkpoints)
    # stored tensor name (``NAME[ROW]`` for an embedding row) -> its checked digest (step counters only)
    digests: dict[str, str] = dataclasses.field(default_factory=dict)

    def snapshot(self) -> "ReadCounters":
        return ReadCounters(self.total, self.calls, self.seconds, dict(self.per_tensor), dict(self.per_layer),
                            self.network, self.cache, dict(self.digests))  # fmt: skip

    def content(self) -> dict:
        """What a step's record keeps of this: the digest of the weights read (None when nothing was
        checked against a digest file) and the bytes by source."""
        return {"weights_digest": weights_digest(self.digests) if self.digests else None,
                "bytes_network": self.network, "bytes_cache": self.cache}  # fmt: skip


def merge_runs(records: list[TensorRecord]) -> list[tuple[Path, int, int, list[int]]]:
    """``(shard, start, end, indices into records)`` for each run of tensors back to back in one shard."""
    order = sorted(range(len(records)), key=lambda i: (str(records[i].shard), records[i].offset))
    runs: list[tuple[Path, int, int, list[int]]] = []
    for i in order:
        rec = records[i]
        if runs and runs[-1][0] == rec.shard and runs[-1][2] == rec.offset:
            shard, start, _, members = runs[-1]
            runs[-1] = (shard, start, rec.offset + rec.nbytes, members + [i])
        else:
            runs.append((rec.shard, rec.offset, rec.offset + rec.nbytes, [i]))
    return runs


class ShardReader:
    """Reads tensors from the shards of one checkpoint. Use as a context manager."""

    def __init__(self, retries: int = 3, backoff_s: float = 0.05, digests: DigestTable | None = None):
        self.retries = retries
        self.backoff_s = backoff_s
        self.digests = digests
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
        """Read tensors (contiguous runs in one shard merged into single reads), check each against
        the digest file when there is one, and count them."""
        labels = labels or [r.stored_name for r in records]
        raws = self._fetch(records)
        checked = {rec.stored_name: self._check(rec, raw) for rec, raw in zip(records, raws)} if self.digests else {}
        self._count([(label, rec.nbytes) for label, rec in zip(labels, records)], layer, checked)
        return [raw.view(rec.numpy_dtype).reshape(rec.shape) for rec, raw in zip(records, raws)]

    def _fetch(self, records: list[TensorRecord]) -> list[np.ndarray]:
        """The raw bytes (uint8) of each record, in order."""
        out: list[np.ndarray] = [None] * len(records)  # type: ignore[list-item]
        for shard, start, end, members in merge_runs(records):
            buf = self._read_range(shard, start, end - start, records[members[0]].stored_name)
            for k in members:
                out[k] = buf[records[k].offset - start : records[k].offset - start + records[k].nbytes]
        return out

    def where(self, shard: Path) -> str:
        """How errors name a shard: its path here, its URL for a remote checkpoint."""
        return str(shard)

    def _check(self, rec: TensorRecord, raw: np.ndarray) -> str:
        assert self.digests is not None
        want = self.digests.expected(rec)
        if want is None:
            raise StorageError(f"{self.where(rec.shard)}: tensor {rec.stored_name!r} at offset {rec.offset} "
                               f"({rec.nbytes} bytes) is not covered by the digest file {self.digests.source}; "
                               "it was written for another checkpoint")  # fmt: skip
        got = blake3.blake3(raw).hexdigest()
        if got != want:
            raise StorageError(f"{self.where(rec.shard)}: tensor {rec.stored_name!r} at offset {rec.offset} "
                               f"({rec.nbytes} bytes): BLAKE3 {got} differs from {want} in the digest file "
                               f"{self.digests.source}; these are not the weights that were digested")  # fmt: skip
        return got

    def _count(self, items: list[tuple[str, int]], layer: int | None, checked: dict[str, str]) -> None:
        with self._lock:
            for counters in (self.run, self.step):
                for label, n in items:
                    counters.total += n
                    counters.per_tensor[label] += n
                    counters.per_layer[layer] += n
            self.step.digests.update(checked)

    def count_source(self, network: int = 0, cache: int = 0) -> None:
        """Bytes of the current reads that came over the network or from the range cache."""
        with self._lock:
            for counters in (self.run, self.step):
                counters.network += network
                counters.cache += cache

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
        self.count_call(shard, offset, nbytes, time.perf_counter() - started)
        return buf

    def count_call(self, shard: Path, offset: int, nbytes: int, elapsed: float) -> None:
        with self._lock:
            for counters in (self.run, self.step):
                counters.calls += 1
                counters.seconds += elapsed
            if self.trace is not None:
                self.trace.append((shard, offset, nbytes, elapsed))


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
