"""Positioned reads: exact bytes, exact accounting, only the experts asked for, clear I/O errors."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

from kimi_jax.errors import StorageError
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ShardReader, evict_page_cache, page_cache_bytes

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402


def _oracle(record):
    """The tensor as the safetensors library itself loads it, as raw bytes."""
    with safe_open(str(record.shard), "pt") as f:
        t = f.get_tensor(record.stored_name)
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("layout", ["kimi-k2.5", "kimi-k2-fp8", "deepseek-v3", "hf-bf16"])
def test_every_tensor_matches_safetensors_and_is_counted(tiny_checkpoints, layout):
    idx = open_checkpoint(tiny_checkpoints[layout])
    weights = list(idx.weights.values())
    with ShardReader() as reader:
        arrays = reader.read_weights(weights, layer=None)
        for w in weights:
            for part, rec in w.parts.items():
                arr = arrays[w.name][part]
                assert arr.shape == rec.shape and arr.dtype == rec.numpy_dtype
                assert arr.tobytes() == _oracle(rec), f"{w.name}:{part}"
        assert reader.run.total == sum(w.nbytes for w in weights)
        assert sum(reader.run.per_tensor.values()) == reader.run.total


def test_expert_selective_reads_touch_only_chosen_experts(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    layer = idx.layers[2]
    chosen = [3, 11]
    with ShardReader() as reader:
        reader.begin_step()
        reader.read_weights(layer.base.values(), layer=2)
        reader.read_weights([w for e in chosen for w in layer.experts[e].values()], layer=2)
        step = reader.end_step()
    assert step.total == layer.base_bytes + sum(layer.expert_bytes(e) for e in chosen)
    assert step.per_layer == {2: step.total}
    touched = {name.split(".")[4] for name in step.per_tensor if ".experts." in name}
    assert touched == {"3", "11"}
    # and the totals are exactly what inspect reports for the layer
    assert layer.expert_bytes(3) == sum(w.nbytes for w in layer.experts[3].values())


def test_step_counters_reset_but_run_counters_accumulate(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    norm = idx.weights["norm.weight"]
    with ShardReader() as reader:
        for _ in range(3):
            reader.begin_step()
            reader.read_weights([norm], layer=None)
            assert reader.end_step().total == norm.nbytes
        assert reader.run.total == 3 * norm.nbytes


def test_transient_errors_are_retried(tiny_checkpoints, monkeypatch):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    w = idx.weights["lm_head.weight"]
    failures = [OSError(errno.EIO, "Input/output error"), OSError(errno.EAGAIN, "try again")]
    real = ShardReader._pread

    def flaky(self, fd, view, offset):
        if failures:
            raise failures.pop(0)
        return real(self, fd, view, offset)

    monkeypatch.setattr(ShardReader, "_pread", flaky)
    with ShardReader(retries=3, backoff_s=0.001) as reader:
        arr = reader.read_weights([w], layer=None)[w.name]["weight"]
    assert arr.tobytes() == _oracle(w.parts["weight"])
    assert not failures


def test_persistent_error_names_shard_tensor_offset(tiny_checkpoints, monkeypatch):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    rec = idx.weights["lm_head.weight"].parts["weight"]

    def broken(self, fd, view, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ShardReader, "_pread", broken)
    with ShardReader(retries=2, backoff_s=0.001) as reader, pytest.raises(StorageError) as e:
        reader.read_records([rec], layer=None)
    msg = str(e.value)
    assert rec.shard.name in msg and "language_model.lm_head.weight" in msg and f"offset {rec.offset}" in msg
    assert "3 attempt(s)" in msg


def test_shard_truncated_after_indexing(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    idx = open_checkpoint(ckpt)
    last = max((p for w in idx.weights.values() for p in w.parts.values()), key=lambda r: r.offset + r.nbytes)
    os.truncate(last.shard, last.offset + 10)
    with ShardReader() as reader, pytest.raises(StorageError, match="truncated") as e:
        reader.read_records([last], layer=None)
    assert last.shard.name in str(e.value) and last.stored_name in str(e.value)


def test_page_cache_eviction_and_residency(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4 << 20))
    with open(path, "rb") as f:
        f.read()
    warm = page_cache_bytes(path)
    evict_page_cache([path])
    cold = page_cache_bytes(path)
    if warm == 0:
        pytest.skip("this filesystem does not report page-cache residency")
    assert warm == path.stat().st_size
    assert cold < warm
