"""The shard reader for a remote checkpoint: the same interface, counters and digest checks as the
local one, with the bytes fetched as concurrent HTTP/S3 range requests (and served from the range
cache where it has them)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from kimi_jax.storage.digests import DigestTable
from kimi_jax.storage.range_cache import RangeCache, range_key
from kimi_jax.storage.reader import ShardReader, merge_runs
from kimi_jax.storage.remote import RemoteFile, RemoteSettings, RemoteStore
from kimi_jax.storage.safetensors_header import TensorRecord


class RemoteShardReader(ShardReader):
    def __init__(self, store: RemoteStore, files: dict[str, RemoteFile], settings: RemoteSettings,
                 digests: DigestTable | None = None):  # fmt: skip
        super().__init__(retries=settings.retries, digests=digests)
        self.store = store
        self.files = files
        self.settings = settings
        on = settings.cache_dir is not None and settings.cache_bytes > 0
        self.cache = RangeCache(settings.cache_dir, settings.cache_bytes) if on else None
        self._fetched = threading.local()  # per thread: which records of the current call came over the network

    def where(self, shard: Path) -> str:
        f = self.files.get(shard.name)
        return f.url if f else str(shard)

    def close(self) -> None:
        pass  # the store (one per checkpoint) outlives readers

    def _key(self, rec: TensorRecord) -> str:
        f = self.files[rec.shard.name]
        return range_key(self.digests.expected(rec) if self.digests else None, f.url, f.etag, rec.offset, rec.nbytes)

    def _fetch(self, records: list[TensorRecord]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(records)
        cached = 0
        if self.cache is not None:
            for i, rec in enumerate(records):
                out[i] = self.cache.get(self._key(rec), rec.nbytes)
                cached += rec.nbytes if out[i] is not None else 0
        missing = [i for i in range(len(records)) if out[i] is None]
        runs = merge_runs([records[i] for i in missing])
        pieces, where = [], []
        for shard, start, end, members in runs:
            buf = np.empty(end - start, dtype=np.uint8)
            label = records[missing[members[0]]].stored_name
            for lo in range(start, end, self.settings.request_bytes):
                hi = min(end, lo + self.settings.request_bytes)
                pieces.append((self.files[shard.name], lo, hi, label))
                where.append((buf, lo - start))
            for k in members:
                rec = records[missing[k]]
                out[missing[k]] = buf[rec.offset - start : rec.offset - start + rec.nbytes]
        started = time.perf_counter()
        bodies = self.store.read_ranges(pieces) if pieces else []
        elapsed = time.perf_counter() - started
        for (buf, at), body in zip(where, bodies):
            buf[at : at + len(body)] = np.frombuffer(body, dtype=np.uint8)
        for (f, lo, hi, _), _body in zip(pieces, bodies):
            self.count_call(Path(f.name), lo, hi - lo, elapsed / len(pieces))
        self.count_source(network=sum(hi - lo for _, lo, hi, _ in pieces), cache=cached)
        self._fetched.indices = missing
        return out  # type: ignore[return-value]

    def read_records(self, records: list[TensorRecord], layer: int | None,
                     labels: list[str] | None = None) -> list[np.ndarray]:  # fmt: skip
        arrays = super().read_records(records, layer, labels)  # checked against the digest file, if any
        if self.cache is not None:
            for i in self._fetched.indices:
                self.cache.put(self._key(records[i]), np.ascontiguousarray(arrays[i]).reshape(-1).view(np.uint8))
        return arrays
