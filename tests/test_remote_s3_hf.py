"""s3:// against moto's S3-protocol server, and hf:// resolution and revision pinning against a local
endpoint serving the Hub's API and resolve URLs (HF_ENDPOINT), all on 127.0.0.1."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.errors import CheckpointError, StorageError
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.remote import RemoteSettings
from kimi_jax.storage.source import open_source

pytest.importorskip("aiohttp")
from tests.range_server import RangeServer  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints, tmp_path_factory):
    path = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path_factory.mktemp("remote") / "ckpt")
    assert CliRunner().invoke(main, ["digest", str(path), "--no-progress"]).exit_code == 0
    return path


def _all_bytes(reader, index) -> dict[str, bytes]:
    got = reader.read_weights(list(index.weights.values()), layer=None)
    return {f"{n}:{p}": a.tobytes() for n, parts in got.items() for p, a in parts.items()}


@pytest.fixture(scope="module")
def local_bytes(ckpt):
    with ShardReader() as reader:
        return _all_bytes(reader, open_checkpoint(ckpt))


# -- s3:// ----------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(key, value)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="kimi-ckpt")
    yield client
    server.stop()


def test_s3_checkpoint_reads_the_same_bytes_checked_against_its_digest_file(ckpt, local_bytes, s3, tmp_path):
    for f in ckpt.iterdir():
        s3.upload_file(str(f), "kimi-ckpt", f"tiny/{f.name}")
    source = open_source("s3://kimi-ckpt/tiny/", tmp_path / "cache")
    assert source.index.location == "s3://kimi-ckpt/tiny"
    assert source.digests is not None and source.digest_file == "s3://kimi-ckpt/tiny/checkpoint.b3.json"
    reader = source.reader()
    assert _all_bytes(reader, source.index) == local_bytes
    assert reader.run.network == reader.run.total == sum(len(b) for b in local_bytes.values())
    # the object is replaced mid-run: the ETag no longer matches, and the error names it
    rec = source.index.weights["layers.1.self_attn.o_proj.weight"].parts["weight"]
    s3.put_object(Bucket="kimi-ckpt", Key=f"tiny/{rec.shard.name}", Body=(ckpt / rec.shard.name).read_bytes()[::-1])
    with pytest.raises(StorageError) as e:
        reader.read_records([rec], layer=1)
    assert f"s3://kimi-ckpt/tiny/{rec.shard.name}" in str(e.value) and repr(rec.stored_name) in str(e.value)
    source.close()


# -- hf:// ----------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub(ckpt, tmp_path, monkeypatch):
    """The Hub's two URL families for repo org/tiny: the revision API, and resolve/COMMIT/FILE. Commit
    OLD serves an empty folder, so reading the wrong revision cannot pass."""
    pytest.importorskip("huggingface_hub")
    empty = tmp_path / "empty"
    empty.mkdir()

    def resolve(path: str):
        for commit, root in ((COMMIT, ckpt), (OLD, empty)):
            prefix = f"/org/tiny/resolve/{commit}/"
            if path.startswith(prefix):
                return root / path[len(prefix) :]
        return None

    info = {"id": "org/tiny", "sha": COMMIT, "siblings": []}
    routes = {f"/api/models/org/tiny/revision/{rev}": info for rev in ("main", "v1", COMMIT)}
    routes["/api/models/org/tiny"] = info  # no revision: the default branch
    routes["/api/models/org/tiny/revision/v0"] = {"id": "org/tiny", "sha": OLD, "siblings": []}
    with RangeServer(resolve, routes) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.base)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


@pytest.mark.parametrize("location", ["hf://org/tiny", "hf://org/tiny@v1"])
def test_hf_revision_is_pinned_to_its_commit_and_read_from_resolve_urls(location, hub, local_bytes, tmp_path):
    source = open_source(location, tmp_path / "cache")
    assert source.index.location == f"hf://org/tiny@{COMMIT}"
    assert source.digest_file == f"hf://org/tiny@{COMMIT}/checkpoint.b3.json" and source.digests is not None
    assert _all_bytes(source.reader(), source.index) == local_bytes
    assert hub.ranges and all(path.startswith(f"/org/tiny/resolve/{COMMIT}/") for path, _, _ in hub.ranges)
    source.close()


def test_hf_unknown_revision_or_empty_commit_is_a_named_error(hub, tmp_path):
    with pytest.raises(CheckpointError, match="hf://org/tiny@nope: not a Hub repository and revision"):
        open_source("hf://org/tiny@nope", tmp_path / "cache")
    with pytest.raises(CheckpointError, match=f"/org/tiny/resolve/{OLD}/config.json: not found"):
        open_source("hf://org/tiny@v0", tmp_path / "cache")


def _timed(call, seconds: float):
    """(seconds taken or None when still running after ``seconds``, the result or exception)."""
    import threading
    import time

    box: list = []

    def run() -> None:
        try:
            box.append(call())
        except Exception as e:  # noqa: BLE001 - handed back to the test to judge
            box.append(e)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return (None if thread.is_alive() else time.monotonic() - started), (box[0] if box else None)


def test_s3_retries_are_bounded_as_a_whole(tmp_path, monkeypatch):
    """Main: botocore's, s3fs's and our retries multiplied (timeout_s 3 gave up after 227 s)."""
    pytest.importorskip("s3fs")
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(key, value)
    with RangeServer(lambda path: None) as stalled:
        stalled.faults.stall_s = 60  # accepts every request and never answers
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", stalled.base)
        settings = RemoteSettings(timeout_s=1.0, retries=1, backoff_s=0.01)
        seconds, outcome = _timed(lambda: open_source("s3://kimi-ckpt/tiny", tmp_path / "cache", remote=settings), 40)
    assert seconds is not None, "still waiting after 40 s"
    assert isinstance(outcome, StorageError) and "failed after 2 attempt(s)" in str(outcome), outcome
    # the bound: (retries + 1) deadlines of timeout_s + 4 MiB (config.json's cap) at 256 KiB/s, plus backoff
    assert seconds < 2 * (1.0 + 16) + 5


def test_hf_revision_lookup_has_a_deadline(hub, tmp_path):
    """Main's model_info call had no timeout: a Hub that trickles its answer held it indefinitely."""
    hub.faults.trickle_routes_s = 0.5  # a byte every half second: no socket timeout ever fires
    settings = RemoteSettings(timeout_s=1.0, retries=0)
    seconds, outcome = _timed(lambda: open_source("hf://org/tiny@v1", tmp_path / "cache", remote=settings), 30)
    assert seconds is not None, "still waiting after 30 s"
    assert isinstance(outcome, CheckpointError) and "revision 'v1' of org/tiny could not be resolved" in str(outcome)
    assert seconds < 1.0 + 4 + 3  # timeout_s + 1 MiB (an API answer's cap) at 256 KiB/s


def test_hf_pin_must_be_a_commit_and_is_not_echoed_whole(hub, tmp_path):
    """Main took any 'sha' as the commit and echoed a 200,000-character one into a 200 KB error."""
    hub.routes["/api/models/org/tiny/revision/v9"] = {"id": "org/tiny", "sha": "f" * 200_000, "siblings": []}
    with pytest.raises(CheckpointError, match="which is not a commit") as e:
        open_source("hf://org/tiny@v9", tmp_path / "cache")
    assert len(str(e.value)) < 400
    hub.routes["/api/models/org/tiny/revision/v9"] = {"id": "org/tiny", "sha": "main", "siblings": []}
    with pytest.raises(CheckpointError, match="'main', which is not a commit"):
        open_source("hf://org/tiny@v9", tmp_path / "cache")


def test_a_bundle_read_from_a_branch_of_the_hub_verifies(hub, tmp_path):
    """Main recorded hf://org/tiny@COMMIT and failed check 2 against manifest.json's hf://org/tiny@main."""
    from kimi_jax.manifest import parse_manifest_dict
    from kimi_jax.run.plan import prepare_run
    from kimi_jax.run.runner import execute
    from kimi_jax.verify.checklist import verify_bundle

    data = {"version": 1, "model": {"checkpoint": "hf://org/tiny@main", "cache_dir": str(tmp_path / "cache")},
            "prompt": {"tokens": [7, 300]}, "generate": {"max_new_tokens": 1}, "output": {"dir": str(tmp_path / "b")}}  # fmt: skip
    outcome = execute(prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml"))), prove=False,
                      echo=lambda *_: None, progress=False)  # fmt: skip
    assert outcome.ledger["checkpoint"]["path"] == f"hf://org/tiny@{COMMIT}"
    report = verify_bundle(tmp_path / "b")  # a --no-prove run: only the proof's check may fail
    assert report.status("receipt") == "OK" and report.failed == ["non-perturbation"], report.format()
