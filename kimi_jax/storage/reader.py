"""Positioned byte-range reads of exactly the tensors asked for, with every byte counted.

Tensors that lie in one shard with gaps of at most ``MERGE_GAP`` bytes between them are fetched
with one ``os.preadv`` call that scatters each tensor into its own buffer and the gaps into a
scratch buffer; the gap bytes are counted as over-read, per layer. Each tensor's buffer is aligned
to ``ALIGNMENT`` bytes, which lets ``jax.device_put`` adopt it on CPU without a copy. Separate
ranges are read by a small pool of threads (queue depth for NVMe and network mounts), and
``advise`` tells the kernel (``posix_fadvise(WILLNEED)``) about reads that are coming.

Counters are kept per tensor, per layer and per step, under a lock so the prefetch thread can read
while the main thread computes. Transient I/O errors are retried with exponential backoff; a
persistent one names shard, tensor and offset.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import blake3
import numpy as np

from kimi_jax.errors import StorageError
from kimi_jax.fileio import open_regular
from kimi_jax.storage.checkpoint import WeightEntry
from kimi_jax.storage.digests import DigestTable, weights_digest
from kimi_jax.storage.safetensors_header import TensorRecord

TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY}
# Largest gap between two tensors still read in one call (the gap is read and discarded): the
# scales and packed words of one expert sit a few KiB apart in a K2.5 shard. A gap is also never
# larger than the tensor after it (or a page, for tiny ones): a run's gaps stay below its tensors'
# bytes plus a page per tensor.
MERGE_GAP = 64 << 10
PAGE = 4096
ALIGNMENT = 64  # XLA's CPU buffers: an aligned numpy buffer is adopted by jax.device_put as it is
PARALLEL_READS = 2  # ranges read at once
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


@dataclasses.dataclass
class ReadCounters:
    """Bytes of the tensors read, keyed three ways (``layer`` is None for the embedding and the head),
    and the bytes of the gaps read between merged tensors (``overread``, also per layer)."""

    total: int = 0
    calls: int = 0
    seconds: float = 0.0
    per_tensor: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    per_layer: dict[int | None, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    network: int = 0  # of ``total``, bytes that came over the network (remote checkpoints)
    cache: int = 0  # of ``total``, bytes served by the local range cache (remote checkpoints)
    # stored tensor name (``NAME[ROW]`` for an embedding row) -> its checked digest (step counters only)
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    overread: int = 0
    per_layer_overread: dict[int | None, int] = dataclasses.field(default_factory=lambda: defaultdict(int))

    def snapshot(self) -> "ReadCounters":
        return ReadCounters(self.total, self.calls, self.seconds, dict(self.per_tensor), dict(self.per_layer),
                            self.network, self.cache, dict(self.digests), self.overread,
                            dict(self.per_layer_overread))  # fmt: skip

    def content(self) -> dict:
        """What a step's record keeps of this: the digest of the weights read (None when nothing was
        checked against a digest file) and the bytes by source."""
        return {"weights_digest": weights_digest(self.digests) if self.digests else None,
                "bytes_network": self.network, "bytes_cache": self.cache}  # fmt: skip


def merge_runs(records: Sequence[TensorRecord], max_gap: int = 0) -> list[tuple[Path, int, int, list[int]]]:
    """``(shard, start, end, indices into records)`` for each run read with one call: same shard, in file
    order, each tensor starting at most ``max_gap`` bytes, and at most its own size (or a page), after
    the previous one ends (0: back to back; a tensor that overlaps the previous one starts a new run)."""
    order = sorted(range(len(records)), key=lambda i: (str(records[i].shard), records[i].offset))
    runs: list[tuple[Path, int, int, list[int]]] = []
    for i in order:
        rec = records[i]
        gap = rec.offset - runs[-1][2] if runs and runs[-1][0] == rec.shard else -1
        if 0 <= gap <= min(max_gap, max(rec.nbytes, PAGE)):
            shard, start, _, members = runs[-1]
            runs[-1] = (shard, start, rec.offset + rec.nbytes, members + [i])
        else:
            runs.append((rec.shard, rec.offset, rec.offset + rec.nbytes, [i]))
    return runs


def overread_bytes(records: Sequence[TensorRecord], max_gap: int = MERGE_GAP) -> int:
    """Bytes between the tensors of merged runs: read, then discarded."""
    return sum(end - start for _, start, end, _ in merge_runs(records, max_gap)) - sum(r.nbytes for r in records)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer of ``nbytes`` whose address is a multiple of ``ALIGNMENT``."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes]


class ShardReader:
    """Reads tensors from the shards of one checkpoint. Use as a context manager."""

    def __init__(self, retries: int = 3, backoff_s: float = 0.05, digests: DigestTable | None = None,
                 parallel_reads: int = PARALLEL_READS):  # fmt: skip
        self.retries = retries
        self.backoff_s = backoff_s
        self.digests = digests
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=parallel_reads, thread_name_prefix="kimi-jax-read") \
            if parallel_reads > 1 else None  # fmt: skip
        self._overread = threading.local()  # per thread: gap bytes of the current _fetch
        self.run = ReadCounters()
        self.step = ReadCounters()
        # When a list: every positioned read appends (shard, offset, nbytes, seconds, perf_counter when it
        # ended); benchmarks use it.
        self.trace: list[tuple[Path, int, int, float, float]] | None = None
        # storage.page_cache (kimi_jax.storage.residency.drops_page_cache): drop each range from the
        # page cache once read, when the shards do not fit in memory.
        self.drop_after_read = False

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
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
        """Read tensors (near neighbours in one shard merged into single reads), check each against
        the digest file when there is one, and count them and the gaps read between them."""
        labels = labels or [r.stored_name for r in records]
        self._overread.bytes = 0
        raws = self._fetch(records)
        checked = {rec.stored_name: self._check(rec, raw) for rec, raw in zip(records, raws)} if self.digests else {}
        self._count([(label, rec.nbytes) for label, rec in zip(labels, records)], layer, checked,
                    self._overread.bytes)  # fmt: skip
        return [raw.view(rec.numpy_dtype).reshape(rec.shape) for rec, raw in zip(records, raws)]

    def read_shares(self, shares: list[tuple[TensorRecord, int, int]], layer: int | None) -> list[np.ndarray]:
        """Rows ``start:stop`` of each whole tensor ``(rec, start, stop)``, in one call. With a digest
        file each share is widened to its tensor's segment boundaries and every segment checked; the
        rows read beyond the share are counted as read and discarded (overread), the share as read,
        and the tensor's own digest joins the step's (its bytes, as far as read, are the digested ones)."""
        if not self.digests:
            return self.read_records([rec.rows(start, stop) for rec, start, stop in shares], layer)
        spans = []
        for rec, start, stop in shares:
            try:
                spans.append(self.digests.share_segments(rec, start, stop))
            except KeyError:
                raise StorageError(f"{self.where(rec.shard)}: tensor {rec.stored_name!r} at offset {rec.offset} "
                                   f"({rec.nbytes} bytes) is not covered by the digest file {self.digests.source}; "
                                   "it was written for another checkpoint")  # fmt: skip
        self._overread.bytes = 0
        raws = self._fetch([rec.rows(first, end) for (rec, _, _), (first, end, _) in zip(shares, spans)])
        out, checked, widened = [], {}, 0
        for (rec, start, stop), (first, end, segments), raw in zip(shares, spans, raws):
            row, at = rec.nbytes // rec.shape[0], 0
            for k, (n, want) in enumerate(segments):
                got = blake3.blake3(raw[at : at + n]).hexdigest()
                if got != want:
                    lo = first + at // row
                    raise StorageError(f"{self.where(rec.shard)}: tensor {rec.stored_name!r}, rows {lo}:{lo + n // row} "
                                       f"(offset {rec.offset + lo * row}, {n} bytes): BLAKE3 {got} differs from {want} "
                                       f"in the digest file {self.digests.source}; these are not the weights that "
                                       "were digested")  # fmt: skip
                at += n
            checked[rec.stored_name] = self.digests.expected(rec)
            widened += (end - first - (stop - start)) * row
            keep = raw[(start - first) * row : (stop - first) * row]
            out.append(keep.view(rec.numpy_dtype).reshape((stop - start, *rec.shape[1:])))
        self._count([(rec.stored_name, (stop - start) * (rec.nbytes // rec.shape[0])) for rec, start, stop in shares],
                    layer, checked, self._overread.bytes + widened)  # fmt: skip
        return out

    def _fetch(self, records: list[TensorRecord]) -> list[np.ndarray]:
        """The raw bytes (uint8, each in its own aligned buffer) of each record, in order; separate
        runs are read on the pool."""
        out: list[np.ndarray] = [None] * len(records)  # type: ignore[list-item]
        runs = merge_runs(records, MERGE_GAP)
        self._overread.bytes = overread_bytes(records, MERGE_GAP)

        def read_run(members: list[int]) -> None:
            for k, buf in zip(members, self._read_run([records[k] for k in members])):
                out[k] = buf

        if self._pool is None or len(runs) < 2:
            for *_, members in runs:
                read_run(members)
        else:
            for done in [self._pool.submit(read_run, members) for *_, members in runs]:
                done.result()
        return out

    def count_served(self, records: Iterable[TensorRecord]) -> None:
        """Tensors a step used from memory: their digests (checked when they were read) join the
        step's, so its weights digest names every weight it used, wherever it came from."""
        if self.digests:
            served = {rec.stored_name: self.digests.expected(rec) for rec in records}
            with self._lock:
                self.step.digests.update(served)

    def uncount_digests(self, records: Iterable[TensorRecord]) -> None:
        """Tensors read this step that it did not use (experts read ahead or preloaded) leave its
        digests: a step's weights digest names the weights behind its token, not what was read besides."""
        if self.digests:
            with self._lock:
                for rec in records:
                    self.step.digests.pop(rec.stored_name, None)

    def advise(self, records: Iterable[TensorRecord]) -> None:
        """Tell the kernel these ranges will be read soon (``posix_fadvise(WILLNEED)``): it starts
        reading them into the page cache in the background; nothing is counted. Advice only: a shard
        that cannot be advised (not a local file) is skipped, its read will say what is wrong."""
        for rec in records:
            if rec.nbytes:
                try:
                    os.posix_fadvise(self._fd(rec.shard), rec.offset, rec.nbytes, os.POSIX_FADV_WILLNEED)
                except (OSError, StorageError):
                    return

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

    def _count(self, items: list[tuple[str, int]], layer: int | None, checked: dict[str, str], overread: int = 0) -> None:
        with self._lock:
            for counters in (self.run, self.step):
                counters.overread += overread
                counters.per_layer_overread[layer] += overread
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

    def _pread(self, fd: int, views: Sequence[memoryview], offset: int) -> int:
        return os.preadv(fd, views, offset)

    def _read_run(self, run: list[TensorRecord]) -> list[np.ndarray]:
        """One scattered read of tensors that lie in order in one shard: an aligned buffer per tensor,
        the gaps between them into a scratch buffer."""
        first = run[0]
        buffers = [aligned_empty(rec.nbytes) for rec in run]
        gaps = [b.offset - (a.offset + a.nbytes) for a, b in zip(run, run[1:])]
        scratch = memoryview(np.empty(max(gaps + [0]), np.uint8))
        views: list[memoryview] = []
        for rec, buf, gap in zip(run, buffers, [0] + gaps):
            if gap:
                views.append(scratch[:gap])
            if rec.nbytes:
                views.append(memoryview(buf))
        nbytes = run[-1].offset + run[-1].nbytes - first.offset
        fd = self._fd(first.shard)
        done, attempt = 0, 0
        started = time.perf_counter()
        while done < nbytes:
            try:
                got = self._pread(fd, _skip(views, done)[:IOV_MAX], first.offset + done)
            except OSError as e:
                if e.errno in TRANSIENT_ERRNOS and attempt < self.retries:
                    attempt += 1
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                raise StorageError(
                    f"{first.shard}: reading tensor {_at(run, done)!r} at offset {first.offset + done} failed after "
                    f"{attempt + 1} attempt(s): {e.strerror or e}"
                ) from None
            if got == 0:
                raise StorageError(
                    f"{first.shard}: unexpected end of file reading tensor {_at(run, done)!r} at offset "
                    f"{first.offset + done} ({nbytes - done} of {nbytes} bytes missing); the shard is truncated"
                )
            done += got
            attempt = 0  # retries count consecutive failures; progress resets them
        self.count_call(first.shard, first.offset, nbytes, time.perf_counter() - started)
        if self.drop_after_read:
            try:
                os.posix_fadvise(fd, first.offset, nbytes, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only
                pass
        return buffers

    def count_call(self, shard: Path, offset: int, nbytes: int, elapsed: float) -> None:
        with self._lock:
            for counters in (self.run, self.step):
                counters.calls += 1
                counters.seconds += elapsed
            if self.trace is not None:
                self.trace.append((shard, offset, nbytes, elapsed, time.perf_counter()))


def _skip(views: list[memoryview], done: int) -> list[memoryview]:
    """The views still to fill after ``done`` bytes of a partial read."""
    out = []
    for view in views:
        if done >= len(view):
            done -= len(view)
            continue
        out.append(view[done:])
        done = 0
    return out


def _at(run: list[TensorRecord], done: int) -> str:
    """The stored name of the tensor (or the gap before it) that byte ``done`` of a run falls in."""
    position = run[0].offset + done
    for rec in run:
        if position < rec.offset + rec.nbytes:
            return rec.stored_name
    return run[-1].stored_name


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
# glibc's mallopt parameter and the size from which read buffers are mapped on their own.
M_MMAP_THRESHOLD = -3
STREAMED_BUFFER_MMAP_BYTES = 4 << 20


def return_freed_buffers() -> bool:
    """Make malloc map every buffer of ``STREAMED_BUFFER_MMAP_BYTES`` or more on its own, so a read
    buffer goes back to the system when it is freed (glibc; returns False elsewhere). By default
    glibc raises that threshold to 32 MiB after the first large free, and buffers below it freed by
    another thread than the one that allocated them stay in that thread's arena (the peak memory this
    saves at full shape is measured in benchmarks/RESULTS.md section 8). The cost is a page fault per 4 KiB of each fresh
    buffer, small next to reading it from storage. Process-wide, so the engine asks for it only
    when streaming a checkpoint larger than memory."""
    try:
        return bool(_load_libc().mallopt(M_MMAP_THRESHOLD, STREAMED_BUFFER_MMAP_BYTES))
    except (OSError, AttributeError):
        return False


def _load_libc():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        if hasattr(libc, "mallopt"):
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = libc
    return _libc


def page_cache_bytes(path: Path) -> int:
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
