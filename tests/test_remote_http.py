"""Remote checkpoints over HTTP: a real server on 127.0.0.1 (tests/range_server.py), the same results
as from disk, exactly the needed ranges, the range cache, and every fault the issue lists."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.errors import CheckpointError, StorageError
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


def _run(tmp_path, checkpoint, out="out", prove=None, **remote):
    # streamed (budget 0): every range fetched is one a step used, so bytes fetched add up to bytes used
    data = {"version": 1, "model": {"checkpoint": str(checkpoint), "cache_dir": str(tmp_path / "cache")},
            "prompt": {"tokens": [7, 300, 7]}, "generate": {"max_new_tokens": 2},
            "storage": {"remote": remote, "resident_bytes": 0}, "output": {"dir": str(tmp_path / out)}}  # fmt: skip
    if not remote:
        del data["storage"]["remote"]
    return execute(prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml"))), prove=prove, echo=_quiet,
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
    # the manifest wrote the URL with a trailing slash, the ledger records it without: still the same
    # checkpoint, so check 2 passes (main failed it); a --no-prove run fails only the proof's check
    report = verify_bundle(tmp_path / "remote")
    assert report.status("receipt") == "OK" and report.failed == ["non-perturbation"], report.format()
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


def test_the_proofs_pass_records_what_it_fetched(ckpt, server, tmp_path):
    # the bare pass of the proof runs first and fills the range cache: the recorded steps then read
    # step 0 from the cache, and without the proof's own counts the run's network traffic reads short
    url = server.base + "/ckpt/"
    proved = _run(tmp_path, url, out="proved", prove="first", cache_gib=1).ledger
    totals = proved["totals"]
    assert totals["proof_bytes_network"] > 0 and proved["steps"][0]["bytes_network"] == 0
    tensor_ranges = [(p, a, b) for p, a, b in server.ranges if a >= 8 and (b - a) != _header_len(ckpt, p)]
    assert sum(b - a for _, a, b in tensor_ranges) == totals["bytes_network"] + totals["proof_bytes_network"]
    assert verify_bundle(tmp_path / "proved").ok


def test_the_readmes_checkpoint_server_serves_a_run(ckpt, tmp_path):
    # tools/serve_checkpoint.py is the Range-capable server the README names for a first remote run
    import re
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "serve_checkpoint.py"
    served = subprocess.Popen([sys.executable, str(tool), str(ckpt), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", served.stdout.readline()).group(0)
        local, remote = _run(tmp_path, ckpt, out="local").ledger, _run(tmp_path, url, out="remote").ledger
        assert _same_steps(local, remote) and remote["totals"]["bytes_network"] == remote["totals"]["bytes_read"]
    finally:
        served.kill()
        served.wait()


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


def test_a_strained_server_gets_fewer_requests_at_once_and_then_more(server, tmp_path):
    source, reader = _reader(server, tmp_path, max_in_flight=8, request_bytes=4096)
    store = source.remote[0]
    server.faults.status = [503]  # one overload: the limit halves once, not once per failed request
    server.faults.delay_s = 0.01
    server.max_active = 0
    lm_head = source.index.weights["lm_head.weight"]
    reader.read_weights([lm_head], layer=None)
    assert store.in_flight.lowered and store.in_flight.lowered[0].startswith("8 -> 4: HTTP 503")
    assert len(store.in_flight.lowered) == 1
    # calm answers raise it by one per twice the limit in a row, back to max_in_flight at most
    for _ in range(6):
        server.max_active = 0
        reader.read_weights([lm_head], layer=None)
    assert store.in_flight.limit == 8 and server.max_active <= 8


def test_a_slow_connection_is_read_as_a_full_listen_queue(server, tmp_path, monkeypatch):
    import kimi_jax.storage.remote_http as remote_http

    monkeypatch.setattr(remote_http, "SLOW_CONNECT_S", 0.0)  # every new connection counts as slow
    source, reader = _reader(server, tmp_path, max_in_flight=8, request_bytes=4096)
    server.faults.delay_s = 0.01
    server.max_active = 0
    reader.read_weights([source.index.weights["lm_head.weight"]], layer=None)
    assert "listen queue" in source.remote[0].in_flight.lowered[0] and server.max_active < 8


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


def test_a_vanished_etag_is_a_change(server, tmp_path):
    """Main used the bytes of a range answered without the ETag seen first: wrong tokens, exit 0."""
    source, reader = _reader(server, tmp_path)
    server.faults.etag_vanish_after = len(server.ranges)
    with pytest.raises(StorageError, match=r'ETag changed from ".*" to nothing \(it vanished\) while reading bytes'):
        reader.read_weights([source.index.weights["norm.weight"]], layer=None)


def test_identity_encoding_is_asked_for_and_anything_else_refused_by_name(server, tmp_path):
    """Main let aiohttp ask for gzip and used the gzip bytes as weights."""
    source, reader = _reader(server, tmp_path)
    assert {h.get("Accept-Encoding") for h in server.request_headers} == {"identity"}
    server.faults.encoding = "gzip"
    with pytest.raises(StorageError, match=r"Content-Encoding 'gzip', though only identity was asked for"):
        reader.read_weights([source.index.weights["norm.weight"]], layer=None)


def _in_thread(call, seconds: float):
    """(finished, result or exception) of ``call`` run in a daemon thread given ``seconds``."""
    import threading

    box: list = []
    thread = threading.Thread(target=lambda: box.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive()), (box[0] if box else None)


def _outcome(call):
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - handed back to the test to judge
        return e


def test_a_trickling_server_is_cut_off_by_a_deadline_from_size_and_a_minimum_rate(server, tmp_path):
    """A byte every 0.2 s never trips a 1 s socket timeout: main read 4 KB for 13 minutes."""
    import time

    source, reader = _reader(server, tmp_path, timeout_s=1.0, retries=1)
    rec = source.index.weights["lm_head.weight"]
    server.faults.trickle_s = 0.2
    started = time.monotonic()
    finished, outcome = _in_thread(lambda: reader.read_weights([rec], layer=None), 30)
    assert finished, "still reading after 30 s"
    assert isinstance(outcome, StorageError) and "failed after 2 attempt(s): no complete answer within" in str(outcome)
    # the bound: (retries + 1) x (timeout_s + bytes / 256 KiB/s) plus the backoff
    assert time.monotonic() - started < 2 * (1.0 + 4 * rec.parts["weight"].nbytes / (256 << 10)) + 3


def test_a_small_file_without_length_is_streamed_through_its_cap(ckpt, server, tmp_path):
    """Main read a 200 answer without Content-Length whole (3.8 GiB, then MemoryError)."""
    for name, cap in (("config.json", "4,194,304"), ("tokenizer_config.json", "16,777,216")):
        server.faults.endless = {f"/ckpt/{name}"}
        with pytest.raises(StorageError, match=rf"/ckpt/{name}: the body runs past {cap} bytes, more than such a file "
                                               "can legitimately hold; it was cut off"):  # fmt: skip
            open_source(server.base + "/ckpt", tmp_path / name, remote=RemoteSettings(retries=0))


def test_shard_headers_are_fetched_in_bounded_batches(server, tmp_path, monkeypatch):
    """Main asked for every shard's header at once (40 shards of 256 MiB headers: 5.8 GiB)."""
    from kimi_jax.storage import remote_index
    from kimi_jax.storage.remote import RemoteStore

    asked, real = [], RemoteStore.read_ranges

    def counted(self, pieces):
        asked.append([(f.name, end - start) for f, start, end, what in pieces if what == "safetensors header"])
        return real(self, pieces)

    monkeypatch.setattr(RemoteStore, "read_ranges", counted)
    monkeypatch.setattr(remote_index, "HEADER_BATCH_BYTES", 1)  # every header a batch of its own
    source = open_source(server.base + "/ckpt", tmp_path / "cache", remote=RemoteSettings(max_in_flight=2))
    batches = [b for b in asked if b]
    assert len(batches) == len(source.index.shards) and all(len(b) == 1 for b in batches)


def test_errors_about_remote_files_name_the_url_not_the_local_mirror(ckpt, tmp_path):
    """Main named CACHE/remote/.../config.json for a bad config.json served over HTTP."""
    served = shutil.copytree(ckpt, tmp_path / "served")
    config = json.loads((served / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = "tiny"
    (served / "config.json").write_text(json.dumps(config))
    with folder_server(served) as srv, pytest.raises(CheckpointError) as e:
        open_source(srv.base + "/ckpt/", tmp_path / "cache")
    assert f"{srv.base}/ckpt/config.json" in str(e.value) and str(tmp_path / "cache") not in str(e.value)


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
