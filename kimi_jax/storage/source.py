"""Where a checkpoint's bytes come from: a local folder or a remote one, with or without a digest file.

:func:`open_source` indexes the checkpoint, finds its digest file (named explicitly, or
``checkpoint.b3.json`` beside the shards, local or remote), checks that the file describes exactly
this checkpoint's tensors, and hands out readers that check every tensor they read against it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from kimi_jax.storage.checkpoint import CheckpointIndex, open_checkpoint
from kimi_jax.storage.digests import DIGEST_FILE, DigestFileError, DigestTable, load_digest_file, shard_tensors
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.remote import RemoteFile, RemoteSettings, RemoteStore, is_remote


@dataclasses.dataclass
class CheckpointSource:
    index: CheckpointIndex
    digests: DigestTable | None  # checked on every read; None: no digest file, or checking switched off
    digest_file: str | None  # the digest file found (checked or not)
    remote: tuple[RemoteStore, dict[str, RemoteFile], RemoteSettings] | None = None

    def reader(self, retries: int = 3) -> ShardReader:
        if self.remote is None:
            return ShardReader(retries=retries, digests=self.digests)
        from kimi_jax.storage.remote_reader import RemoteShardReader

        store, files, settings = self.remote
        return RemoteShardReader(store, files, dataclasses.replace(settings, retries=retries), self.digests)

    def close(self) -> None:
        if self.remote is not None:
            self.remote[0].close()


def open_source(location: str | Path, cache_dir: Path, verify_digests: bool = True, digest_file: Path | None = None,
                remote: RemoteSettings = RemoteSettings()) -> CheckpointSource:  # fmt: skip
    """Index a checkpoint (a folder or an http(s)/hf/s3 URL) and load the digest file it is checked against."""
    remote_parts = None
    if is_remote(location):
        from kimi_jax.storage.remote_index import open_remote_checkpoint

        index, store, files = open_remote_checkpoint(str(location), remote, cache_dir)
        remote_parts = (store, files, remote)
    else:
        index = open_checkpoint(location)
    try:
        return _with_digests(index, remote_parts, verify_digests, digest_file)
    except BaseException:
        if remote_parts is not None:
            remote_parts[0].close()  # no connection left open behind an error
        raise


def _with_digests(index: CheckpointIndex, remote_parts, verify_digests: bool,
                  digest_file: Path | None) -> CheckpointSource:  # fmt: skip
    found = Path(digest_file) if digest_file else index.root / DIGEST_FILE  # a remote one is mirrored into root
    if not os.path.lexists(found):  # a FIFO, a device or a folder there is refused when read, never ignored
        if digest_file:
            raise DigestFileError(f"{found}: the digest file named in the manifest does not exist")
        return CheckpointSource(index, None, None, remote_parts)
    where = str(found) if digest_file or remote_parts is None else f"{index.location}/{DIGEST_FILE}"
    if not verify_digests:
        return CheckpointSource(index, None, where, remote_parts)
    table = load_digest_file(found, where)
    table.check_matches(shard_tensors(index))
    return CheckpointSource(index, table, where, remote_parts)
