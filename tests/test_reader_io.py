"""Reader I/O: merged ranges with counted over-read, aligned buffers JAX adopts, parallel reads, WILLNEED."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kimi_jax.storage import reader as reader_module
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ALIGNMENT, MERGE_GAP, ShardReader, aligned_empty, merge_runs, overread_bytes
from kimi_jax.storage.safetensors_header import TensorRecord


def _blob(tmp_path: Path, nbytes: int = 1 << 20) -> tuple[Path, bytes]:
    data = np.random.default_rng(0).bytes(nbytes)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


def _rec(path: Path, offset: int, nbytes: int, name: str) -> TensorRecord:
    return TensorRecord(name, path, offset, nbytes, "U8", (nbytes,))


def test_near_neighbours_share_one_read_and_the_gap_is_counted(tmp_path):
    path, data = _blob(tmp_path)
    c = 4100 + MERGE_GAP + 1  # one byte past the bound after d: its own read
    records = [_rec(path, 0, 1000, "a"), _rec(path, 1000 + 300, 500, "b"),  # 300-byte gap: merged
               _rec(path, c, 64, "c"), _rec(path, 4000, 100, "d"),  # d: between b and c in the file
               _rec(path, c + 64 + 5000, 100, "e")]  # gap > a page and > e itself: its own read  # fmt: skip
    assert [members for *_, members in merge_runs(records, MERGE_GAP)] == [[0, 1, 3], [2], [4]]  # a, b, d; c; e
    assert len(merge_runs(records)) == 5  # the default: only tensors back to back
    with ShardReader(parallel_reads=1) as reader:
        reader.trace = []
        arrays = reader.read_records(records, layer=7)
        for rec, arr in zip(records, arrays):
            assert arr.tobytes() == data[rec.offset : rec.offset + rec.nbytes]
        gaps = 300 + (4000 - 1800)
        assert overread_bytes(records) == gaps
        assert reader.run.total == sum(r.nbytes for r in records)  # tensor bytes only
        assert reader.run.overread == reader.run.per_layer_overread[7] == gaps > 0
        assert sum(n for _, _, n, *_ in reader.trace) == reader.run.total + reader.run.overread
        assert len(reader.trace) == 3


def test_buffers_are_aligned_and_adopted_by_jax_without_a_copy(tiny_checkpoints):
    jax = pytest.importorskip("jax")
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    weights = list(idx.layers[1].base.values())
    with ShardReader() as reader:
        parts = reader.read_weights(weights, layer=1)
    for w in weights:
        for arr in parts[w.name].values():
            assert arr.ctypes.data % ALIGNMENT == 0
            if arr.nbytes:
                adopted = jax.device_put(arr)
                assert adopted.unsafe_buffer_pointer() == arr.ctypes.data, w.name
    assert aligned_empty(1).ctypes.data % ALIGNMENT == 0


@pytest.mark.parametrize("layout", ["kimi-k2.5", "kimi-k2-fp8"])
def test_parallel_reads_give_the_same_bytes_and_counts(tiny_checkpoints, layout):
    idx = open_checkpoint(tiny_checkpoints[layout])
    weights = list(idx.weights.values())
    results = []
    for parallel in (1, 3):
        with ShardReader(parallel_reads=parallel) as reader:
            arrays = reader.read_weights(weights, layer=None)
            results.append(({(n, p): a.tobytes() for n, parts in arrays.items() for p, a in parts.items()},
                            reader.run.total, reader.run.overread))  # fmt: skip
    assert results[0] == results[1]
    assert results[0][1] == sum(w.nbytes for w in weights)


def test_partial_reads_continue_across_buffers(tmp_path, monkeypatch):
    path, data = _blob(tmp_path)
    real = ShardReader._pread

    def short(self, fd, views, offset):  # at most 7 bytes per call: buffer boundaries are crossed mid-way
        return real(self, fd, [views[0][:7]], offset)

    monkeypatch.setattr(ShardReader, "_pread", short)
    records = [_rec(path, 10, 20, "a"), _rec(path, 33, 9, "b"), _rec(path, 50, 30, "c")]
    with ShardReader(parallel_reads=1) as reader:
        arrays = reader.read_records(records, layer=None)
    for rec, arr in zip(records, arrays):
        assert arr.tobytes() == data[rec.offset : rec.offset + rec.nbytes]


def test_advise_reads_nothing_it_counts(tmp_path, monkeypatch):
    path, _ = _blob(tmp_path)
    advised = []
    monkeypatch.setattr(reader_module.os, "posix_fadvise", lambda fd, off, n, how: advised.append((off, n, how)))
    with ShardReader() as reader:
        reader.advise([_rec(path, 4096, 8192, "a"), _rec(path, 0, 0, "empty")])
        assert reader.run.total == reader.run.calls == 0
    assert advised == [(4096, 8192, os.POSIX_FADV_WILLNEED)]


def test_freed_read_buffers_are_mapped_on_their_own_on_glibc():
    """The engine's request for a fixed mmap threshold takes on glibc (mallopt returns 1)."""
    import platform

    from kimi_jax.storage.reader import return_freed_buffers

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert return_freed_buffers() is True
