"""Index a remote checkpoint: config, index file and shard headers fetched once, then cached.

The small files (``config.json``, ``model.safetensors.index.json``, the tokenizer's files,
``checkpoint.b3.json``) and each shard's header bytes are kept in a local mirror folder
(``CACHE/remote/NAME-HASH/``), which becomes the index's ``root``; shard records point at
``root/SHARD`` though only the header is ever stored there. A cached header is reused while the
shard's size and ETag are unchanged, so a second run asks only for each shard's metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import blake3

from kimi_jax.config import load_model_config
from kimi_jax.errors import CheckpointError
from kimi_jax.fileio import write_bytes_atomic, write_json_atomic
from kimi_jax.storage.checkpoint import CheckpointIndex, index_from_headers, shard_names
from kimi_jax.storage.digests import DIGEST_FILE
from kimi_jax.storage.remote import RemoteFile, RemoteSettings, RemoteStore, open_transport
from kimi_jax.storage.safetensors_header import header_length, parse_shard_header
from kimi_jax.text.tokenizer import TOKENIZER_FILES

SMALL_FILES = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES, DIGEST_FILE)
SINGLE_SHARD = "model.safetensors"


def mirror_dir(cache_dir: Path, location: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", location.split("://", 1)[-1]).strip("-")[-60:]
    return Path(cache_dir) / "remote" / f"{slug}-{blake3.blake3(location.encode()).hexdigest()[:16]}"


def _fetch_headers(store: RemoteStore, files: list[RemoteFile], mirror: Path) -> list[bytes]:
    """The JSON header bytes of remote shards: all length prefixes at once, then all headers at once."""
    prefixes = store.read_ranges([(f, 0, min(8, f.size), "safetensors header length") for f in files])
    lengths = [header_length(mirror / f.name, prefix, f.size) for f, prefix in zip(files, prefixes)]
    return store.read_ranges([(f, 8, 8 + n, "safetensors header") for f, n in zip(files, lengths)])


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
    cfg = load_model_config(mirror)
    names = shard_names(mirror) or [SINGLE_SHARD]
    files = dict(zip(names, store.stat_all(names)))
    known_file = mirror / "headers.json"
    known = json.loads(known_file.read_text()) if known_file.exists() else {}
    raw: dict[str, bytes] = {}
    for name, f in files.items():
        cached, raw_file = known.get(name), mirror / f"{name}.header"
        if cached and f.etag and cached == {"size": f.size, "etag": f.etag} and raw_file.exists():
            raw[name] = raw_file.read_bytes()
    stale = [f for name, f in files.items() if name not in raw]
    for f, data in zip(stale, _fetch_headers(store, stale, mirror) if stale else []):
        write_bytes_atomic(mirror / f"{f.name}.header", data)
        raw[f.name] = data
    headers = [parse_shard_header(mirror / name, raw[name], f.size) for name, f in files.items()]
    updated = {name: {"size": f.size, "etag": f.etag} for name, f in files.items()}
    write_json_atomic(known_file, updated)
    return index_from_headers(mirror, cfg, tuple(headers), source=pinned), files
