"""A bounded local cache of remote byte ranges, so a second run reads locally what the first fetched.

Entries are keyed by the tensor's content digest when a digest file gives one (the same bytes are
found again whatever URL served them), otherwise by URL + ETag + range (a replaced file has another
ETag, so stale bytes are never served). Each entry is one file, written atomically; when the total
exceeds the bound, the least recently used entries are deleted. Only bytes that passed the digest
check (where there is one) are stored.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import blake3
import numpy as np

from kimi_jax.fileio import write_bytes_atomic


def range_key(digest: str | None, url: str, etag: str | None, offset: int, nbytes: int) -> str:
    if digest is not None:
        return "b3-" + digest
    return "url-" + blake3.blake3(f"{url}\n{etag}\n{offset}\n{nbytes}".encode()).hexdigest()


class RangeCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._total = sum(p.stat().st_size for p in self._entries())

    def _entries(self) -> list[Path]:
        return [p for p in self.root.glob("*/*") if p.is_file() and not p.name.startswith(".")]

    def path(self, key: str) -> Path:
        return self.root / key[-2:] / key

    def get(self, key: str, nbytes: int) -> np.ndarray | None:
        path = self.path(key)
        try:
            if path.stat().st_size != nbytes:
                return None
            data = np.fromfile(path, dtype=np.uint8)
            os.utime(path)  # recently used: evicted last
        except OSError:
            return None
        return data if data.size == nbytes else None

    def put(self, key: str, data: np.ndarray) -> None:
        if data.nbytes > self.max_bytes:
            return
        path = self.path(key)
        if path.exists():
            return
        write_bytes_atomic(path, data.tobytes())
        with self._lock:
            self._total += data.nbytes
            if self._total > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        entries = sorted(self._entries(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for p in entries:
            if total <= self.max_bytes:
                break
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            total -= size
        self._total = total
