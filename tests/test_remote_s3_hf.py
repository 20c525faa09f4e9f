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
