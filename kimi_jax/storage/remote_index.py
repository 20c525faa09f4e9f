"""Index a remote checkpoint: config, index file and shard headers fetched once, then cached.

The small files (``config.json``, ``model.safetensors.index.json``, the tokenizer's files,
``checkpoint.b3.json``) and each shard's header bytes are kept in a local mirror folder
(``CACHE/remote/NAME-HASH/``), which becomes the index's ``root``; shard records point at
``root/SHARD`` though only the header is ever stored there. A cached header is reused while the
shard's size and ETag are unchanged, so a second run asks only for each shard's metadata.

Shard headers are fetched in batches of at most :data:`~kimi_jax.storage.remote.HEADER_BATCH_BYTES`
(each header at most 256 MiB, as for a local shard), and each is parsed and dropped before the next
batch, so the raw bytes held at once stay bounded whatever the number of shards. Every error about
a mirrored file names its URL, never the mirror folder.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import blake3

from kimi_jax.config import load_model_config
from kimi_jax.errors import CheckpointError, KimiJaxError
from kimi_jax.fileio import read_json, read_regular, write_bytes_atomic, write_json_atomic
from kimi_jax.storage.checkpoint import CheckpointIndex, index_from_headers, shard_names
from kimi_jax.storage.digests import DIGEST_FILE
from kimi_jax.storage.remote import HEADER_BATCH_BYTES, RemoteFile, RemoteSettings, RemoteStore, relocated
from kimi_jax.storage.safetensors_header import MAX_HEADER_BYTES, ShardHeader, header_length, parse_shard_header
from kimi_jax.text.tokenizer import TOKENIZER_FILES

SMALL_FILES = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES, DIGEST_FILE)
SINGLE_SHARD = "model.safetensors"


def mirror_dir(cache_dir: Path, location: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", location.split("://", 1)[-1]).strip("-")[-60:]
    return Path(cache_dir) / "remote" / f"{slug}-{blake3.blake3(location.encode()).hexdigest()[:16]}"


def _fetch_headers(store: RemoteStore, files: list[RemoteFile], mirror: Path) -> Iterator[tuple[RemoteFile, bytes]]:
    """The JSON header bytes of remote shards, in batches of at most :data:`HEADER_BATCH_BYTES` (and
    ``max_in_flight`` shards' length prefixes at a time): the caller parses each and drops it."""
    step = max(1, store.settings.max_in_flight)
    for i in range(0, len(files), step):
        group = files[i : i + step]
        prefixes = store.read_ranges([(f, 0, min(8, f.size), "safetensors header length") for f in group])
        lengths = [header_length(mirror / f.name, prefix, f.size) for f, prefix in zip(group, prefixes)]
        batch: list[tuple[RemoteFile, int]] = []
        for f, n in zip(group, lengths):
            if batch and sum(m for _, m in batch) + n > HEADER_BATCH_BYTES:
                yield from zip((g for g, _ in batch), store.read_ranges([(g, 8, 8 + m, "safetensors header")
                                                                          for g, m in batch]))  # fmt: skip
                batch = []
            batch.append((f, n))
        if batch:
            yield from zip((g for g, _ in batch), store.read_ranges([(g, 8, 8 + m, "safetensors header")
                                                                      for g, m in batch]))  # fmt: skip


@contextlib.contextmanager
def _named_by_url(mirror: Path, location: str) -> Iterator[None]:
    """Errors about files in the local mirror name the remote location instead."""
    try:
        yield
    except KimiJaxError as e:
        raise relocated(e, mirror, location) from None


def open_transport(location: str, settings: RemoteSettings):
    """(transport, location with any revision pinned) for a remote checkpoint folder."""
    from kimi_jax.storage.remote_http import HttpTransport, hf_transport

    if location.startswith("hf://"):
        return hf_transport(location, settings)
    if location.startswith("s3://"):
        from kimi_jax.storage.remote_s3 import S3Transport

        return S3Transport(location, settings), location.rstrip("/")
    return HttpTransport(location, settings), location.rstrip("/")


def open_remote_checkpoint(location: str, settings: RemoteSettings, cache_dir: Path
                           ) -> tuple[CheckpointIndex, RemoteStore, dict[str, RemoteFile]]:  # fmt: skip
    """Index a remote checkpoint folder; returns the index, its request store and its shard files."""
    transport, pinned = open_transport(location, settings)
    store = RemoteStore(transport, settings)
    try:
        index, files = _index(store, transport, pinned, cache_dir)
    except BaseException:
        store.close()  # no connection left open behind an error
        raise
    return index, store, files


def _index(store: RemoteStore, transport, pinned: str,
           cache_dir: Path) -> tuple[CheckpointIndex, dict[str, RemoteFile]]:  # fmt: skip
    mirror = mirror_dir(cache_dir, pinned)
    for name in SMALL_FILES:
        data = store.get_small(name)
        if data is None:
            (mirror / name).unlink(missing_ok=True)
            if name == "config.json":
                raise CheckpointError(f"{transport.url(name)}: not found; a checkpoint folder needs config.json")
            continue
        write_bytes_atomic(mirror / name, data)
    with _named_by_url(mirror, transport.url("")):
        cfg = load_model_config(mirror)
        names = shard_names(mirror) or [SINGLE_SHARD]
    files = dict(zip(names, store.stat_all(names)))
    known_file = mirror / "headers.json"
    try:  # our own cache, but a damaged one only costs the headers' fetch
        known = read_json(known_file, 16 << 20, "header cache") if os.path.lexists(known_file) else {}
    except KimiJaxError:
        known = {}
    known = known if isinstance(known, dict) else {}
    headers: dict[str, ShardHeader] = {}
    with _named_by_url(mirror, transport.url("")):
        for name, f in files.items():
            cached, raw_file = known.get(name), mirror / f"{name}.header"
            if cached and f.etag and cached == {"size": f.size, "etag": f.etag} and raw_file.is_file():
                try:
                    raw = read_regular(raw_file, MAX_HEADER_BYTES, "cached shard header", CheckpointError)
                    headers[name] = parse_shard_header(mirror / name, raw, f.size)
                except KimiJaxError:
                    pass  # fetched again below
        stale = [f for name, f in files.items() if name not in headers]
        for f, data in _fetch_headers(store, stale, mirror):
            headers[f.name] = parse_shard_header(mirror / f.name, data, f.size)
            write_bytes_atomic(mirror / f"{f.name}.header", data)
        write_json_atomic(known_file, {name: {"size": f.size, "etag": f.etag} for name, f in files.items()})
        index = index_from_headers(mirror, cfg, tuple(headers[name] for name in files), source=pinned)
    return index, files
