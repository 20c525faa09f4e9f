"""Remote checkpoints over HTTP: a real server on 127.0.0.1 (tests/range_server.py), the same results
as from disk, exactly the needed ranges, the range cache, and every fault the issue lists."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.errors import StorageError
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.remote import RemoteSettings, require
from kimi_jax.storage.source import open_source
from kimi_jax.verify.checklist import verify_bundle

pytest.importorskip("aiohttp")
from tests.range_server import folder_server  # noqa: E402


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints, tmp_path_factory):
    path = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path_factory.mktemp("served") / "ckpt")
    assert CliRunner().invoke(main, ["digest", str(path), "--no-progress"]).exit_code == 0
    return path


@pytest.fixture
def server(ckpt):
    with folder_server(ckpt) as srv:
        yield srv


def _run(tmp_path, checkpoint, out="out", **remote):
    data = {"version": 1, "model": {"checkpoint": str(checkpoint), "cache_dir": str(tmp_path / "cache")},
            "prompt": {"tokens": [7, 300, 7]}, "generate": {"max_new_tokens": 2}, "storage": {"remote": remote},
            "output": {"dir": str(tmp_path / out)}}  # fmt: skip
    if not remote:
        del data["storage"]
    return execute(prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml"))), prove=False, echo=_quiet,
                   progress=False)  # fmt: skip


def _same_steps(a, b):
    keys = ("token", "hidden_digest", "logits_digest", "bytes_read", "weights_digest")
    return [{k: s[k] for k in keys} for s in a["steps"]] == [{k: s[k] for k in keys} for s in b["steps"]]


def test_run_over_http_equals_local_reads_exact_ranges_then_the_cache(ckpt, server, tmp_path):
    local = _run(tmp_path, ckpt, out="local").ledger
    url = server.base + "/ckpt/"
    remote = _run(tmp_path, url, out="remote", cache_gib=1).ledger
    assert _same_steps(local, remote)
    assert remote["checkpoint"]["path"] == server.base + "/ckpt" and remote["checkpoint"]["storage"] == "http"
    assert remote["checkpoint"]["content_root"] == local["checkpoint"]["content_root"] is not None
    # the tokenizer files come with the other small files: the same text fields, verified from the bundle
    assert remote["checkpoint"]["tokenizer"] == local["checkpoint"]["tokenizer"] is not None
    assert remote["text"] == local["text"] and verify_bundle(tmp_path / "remote").status("text") == "OK"
    for step in remote["steps"]:  # the cache is keyed by content: identical tensors (norms of ones) hit it at once
        assert step["bytes_network"] + step["bytes_cache"] == step["bytes_read"] and step["bytes_network"] > 0
    # every tensor range asked for was needed: beyond the header reads, they add up to the bytes fetched
    tensor_ranges = [(p, a, b) for p, a, b in server.ranges if a >= 8 and (b - a) != _header_len(ckpt, p)]
    assert sum(b - a for _, a, b in tensor_ranges) == remote["totals"]["bytes_network"]

    server.ranges.clear()
    again = _run(tmp_path, url, out="again", cache_gib=1).ledger  # same cache: nothing over the network
    assert _same_steps(local, again)
    assert again["totals"]["bytes_network"] == 0 and again["totals"]["bytes_cache"] == again["totals"]["bytes_read"]
    assert server.ranges == []  # headers came from the mirror, tensors from the cache


def _header_len(ckpt, path: str) -> int:
    raw = (ckpt / path.rsplit("/", 1)[-1]).read_bytes()
    return int.from_bytes(raw[:8], "little")


def _reader(server, tmp_path, **settings):
    settings = {"backoff_s": 0.001, "retries": 3, **settings}
    source = open_source(server.base + "/ckpt", tmp_path / "cache", remote=RemoteSettings(**settings))
    return source, source.reader(settings["retries"])


def _local_bytes(ckpt, names):
    from kimi_jax.storage.checkpoint import open_checkpoint

    index = open_checkpoint(ckpt)
    with ShardReader() as reader:
        got = reader.read_weights([index.weights[n] for n in names], layer=None)
    return {n: {p: a.tobytes() for p, a in parts.items()} for n, parts in got.items()}


def test_requests_overlap_up_to_max_in_flight(server, tmp_path):
    source, reader = _reader(server, tmp_path, max_in_flight=4, request_bytes=4096)
    server.faults.delay_s = 0.01
    server.max_active = 0
    reader.read_weights([source.index.weights["lm_head.weight"]], layer=None)
    assert server.max_active == 4


def test_dropped_connections_errors_and_short_bodies_are_retried(ckpt, server, tmp_path):
    source, reader = _reader(server, tmp_path)
    names = [n for n in source.index.weights if n.startswith("layers.1.")]
    server.faults.drop, server.faults.status, server.faults.short = 2, [503, 500], 1
    got = reader.read_weights([source.index.weights[n] for n in names], layer=1)
    assert {n: {p: a.tobytes() for p, a in parts.items()} for n, parts in got.items()} == _local_bytes(ckpt, names)
    assert server.faults.drop <= 0 and not server.faults.status and server.faults.short <= 0


def test_a_persistent_failure_names_url_tensor_and_range(server, tmp_path):
    source, reader = _reader(server, tmp_path, retries=2)
    w = source.index.weights["norm.weight"]
    rec = w.parts["weight"]
    server.faults.status = [503] * 3
    with pytest.raises(StorageError) as e:
        reader.read_weights([w], layer=None)
    msg = str(e.value)
    assert f"{server.base}/ckpt/{rec.shard.name}" in msg and repr(rec.stored_name) in msg
    assert f"bytes {rec.offset}-{rec.offset + rec.nbytes - 1}" in msg and "3 attempt(s): HTTP 503" in msg
    server.faults.status = []
    server.faults.short = 10
    with pytest.raises(StorageError, match="short body"):
        reader.read_weights([w], layer=None)


def test_a_server_that_ignores_range_is_cut_off(server, tmp_path):
    source, reader = _reader(server, tmp_path)
    server.faults.ignore_range, server.faults.huge_body = True, 500 << 30  # "here are 500 GB"
    server.body_bytes_sent = 0
    with pytest.raises(StorageError, match="ignored the Range header") as e:
        reader.read_weights([source.index.weights["norm.weight"]], layer=None)
    assert str(500 << 30) in str(e.value)
    assert server.body_bytes_sent <= 256 << 20  # the server gave up once the client hung up


def test_other_bytes_than_the_digest_file_says_write_nothing(server, tmp_path):
    index = open_source(server.base + "/ckpt", tmp_path / "cache").index
    rec = index.layers[1].base["layers.1.self_attn.o_proj.weight"].parts["weight"]
    server.faults.flip = (rec.shard.name, rec.offset + 5)
    with pytest.raises(StorageError) as e:
        _run(tmp_path, server.base + "/ckpt/", cache_gib=1)
    msg = str(e.value)
    assert f"{server.base}/ckpt/{rec.shard.name}" in msg and repr(rec.stored_name) in msg
    assert f"at offset {rec.offset}" in msg and "digest file" in msg
    assert not (tmp_path / "out").exists()
    cached = [p for p in (tmp_path / "cache" / "ranges").rglob("b3-*")]
    digests = json.loads((server.resolve("/ckpt/checkpoint.b3.json")).read_text())["tensors"]
    assert f"b3-{digests[rec.stored_name]['digest']}" not in {p.name for p in cached}  # bad bytes never cached


def test_a_changed_etag_between_requests_is_an_error(server, tmp_path):
    source, reader = _reader(server, tmp_path)
    server.faults.etag_change_after = len(server.ranges)
    with pytest.raises(StorageError, match='ETag changed from ".*" to "replaced"'):
        reader.read_weights([source.index.weights["norm.weight"]], layer=None)


def test_without_the_remote_extra_the_error_names_it():
    with pytest.raises(StorageError, match=r"optional 'remote' extra: pip install 'kimi-jax\[remote\]'"):
        require("kimi_jax_no_such_module", "http(s)://")


def test_manifest_keeps_checkpoint_urls_and_rejects_empty_ones(tmp_path):
    base = {"version": 1, "prompt": {"tokens": [1]}, "output": {"dir": "out"}}
    for url in ("https://example.org/models/kimi/", "hf://moonshotai/Kimi-K2.5@main", "s3://bucket/prefix"):
        m = parse_manifest_dict({**base, "model": {"checkpoint": url}}, base_dir=tmp_path)
        assert m.model.checkpoint == url and m.resolved_dict()["model"]["checkpoint"] == url
    with pytest.raises(Exception, match="model.checkpoint: checkpoint URL 'http://' names no host"):
        parse_manifest_dict({**base, "model": {"checkpoint": "http://"}}, base_dir=tmp_path)


def test_range_cache_stays_within_its_bound_evicting_least_recently_used(tmp_path):
    import os

    import numpy as np

    from kimi_jax.storage.range_cache import RangeCache, range_key

    cache = RangeCache(tmp_path / "ranges", max_bytes=1000)
    blobs = {k: np.full(400, i, dtype=np.uint8) for i, k in enumerate(("b3-" + "a" * 64, "b3-" + "b" * 64))}
    for i, (key, data) in enumerate(blobs.items()):
        cache.put(key, data)
        os.utime(cache.path(key), (1000 + i, 1000 + i))  # a, then b: a is the least recently used
    assert cache.get("b3-" + "a" * 64, 400) is not None  # reading a makes b the oldest
    third = range_key(None, "http://h/x", '"e1"', 0, 400)
    assert third != range_key(None, "http://h/x", '"e2"', 0, 400)  # another ETag is another entry
    cache.put(third, np.full(400, 9, dtype=np.uint8))
    assert cache.get("b3-" + "b" * 64, 400) is None
    assert cache.get("b3-" + "a" * 64, 400).tolist() == [0] * 400 and cache.get(third, 400).tolist() == [9] * 400
    assert sum(p.stat().st_size for p in (tmp_path / "ranges").rglob("*") if p.is_file()) <= 1000
