"""Byte ranges of a remote checkpoint: ``http(s)://``, ``hf://org/model[@revision]`` and ``s3://bucket/prefix``.

Every request runs on fsspec's I/O event loop, so many can be in flight at once
(``RemoteSettings.max_in_flight``) while the engine's threads wait for them
(:class:`RemoteStore`). ``s3://`` goes through s3fs (:mod:`kimi_jax.storage.remote_s3`).
``hf://`` is resolved, with one request to the Hub's revision API, to the ``resolve`` URLs of
its commit, which are then read like any HTTP folder (:mod:`kimi_jax.storage.remote_http`).
HTTP ranges use aiohttp directly rather than fsspec's ``HTTPFileSystem``, because each response
must be judged before its body is read: a server that answers a range request with the whole
file (HTTP 200) is cut off at once, never read to the end, and the ``ETag``, ``Last-Modified``,
``Content-Encoding`` and ``Content-Range`` of every response are compared with what was asked.
This module holds what both transports share: settings, file records, the checks of an answer,
the retrying store, and the locations as the user wrote them.

A server is a stranger too. What it may do, and what then happens:

* be slow: every request has a total deadline, ``timeout_s`` plus its size at
  :data:`MIN_BYTES_PER_S` (a server trickling a byte per ``timeout_s`` is cut off), and the
  retries of one request together have a deadline of their own (:meth:`RemoteStore._retrying`);
* send too much: small files (config, index, tokenizer, digest file) are streamed through a
  per-file cap (:data:`SMALL_FILE_LIMITS`), never read whole, whatever Content-Length says or
  omits; range bodies are read to exactly the range's length;
* compress: identity encoding is requested, and a body with any other ``Content-Encoding`` is
  refused by name (its bytes are not the file's);
* change the file: the ETag and Last-Modified seen first must come back on every range, and a
  validator that disappears is a change.

Transient failures (dropped connections, HTTP 429/5xx, short bodies, timeouts) are retried with
exponential backoff and jitter; a persistent one, a changed file or an ignored Range is a
:class:`~kimi_jax.errors.StorageError` naming the URL and the byte range (the reader adds the tensor).
These packages are the optional ``remote`` extra; without them a remote checkpoint is a clear error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from kimi_jax.errors import CheckpointError, KimiJaxError, StorageError

REMOTE_SCHEMES = ("http://", "https://", "hf://", "s3://")
# The slowest a request's body may arrive, on average, after timeout_s of grace: 2 Mbit/s. A
# 16 MiB range gets timeout_s + 64 s.
MIN_BYTES_PER_S = 256 << 10
# The small files, capped as the local readers cap them; anything not listed is a metadata file of
# at most SMALL_FILE_LIMIT.
SMALL_FILE_LIMIT = 16 << 20
SMALL_FILE_LIMITS = {"config.json": 4 << 20, "model.safetensors.index.json": 256 << 20,
                     "checkpoint.b3.json": 256 << 20, "tokenizer.json": 64 << 20, "tiktoken.model": 32 << 20}  # fmt: skip
API_LIMIT = 1 << 20  # one Hub API answer
HEADER_BATCH_BYTES = 64 << 20  # shard headers fetched at once, in bytes
COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def clip(text: Any, limit: int = 120) -> str:
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def deadline_s(settings: "RemoteSettings", nbytes: int) -> float:
    """How long one request for ``nbytes`` may take in all."""
    return settings.timeout_s + nbytes / MIN_BYTES_PER_S


def is_remote(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(REMOTE_SCHEMES)


def require(module: str, scheme: str):
    """Import an optional dependency of the ``remote`` extra, or say which extra is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise StorageError(f"reading {scheme} checkpoints needs the optional 'remote' extra: pip install "
                           f"'kimi-jax[remote]' ({module} is not installed)") from None  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RemoteSettings:
    max_in_flight: int = 8  # range requests in flight at once
    timeout_s: float = 30.0  # connect and per-read socket timeout
    retries: int = 3  # retries of a transient failure per request
    backoff_s: float = 0.25  # first retry delay; doubles per retry, with jitter in [0.5, 1.5)
    request_bytes: int = 16 << 20  # longest single range request; longer runs are split
    cache_dir: Path | None = None  # local range cache; None: no cache
    cache_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str  # file name inside the checkpoint folder
    url: str
    size: int
    etag: str | None  # as first seen; every later response must carry the same one
    last_modified: str | None = None  # likewise


def check_validators(f: RemoteFile, etag: str | None, last_modified: str | None, start: int, end: int) -> None:
    """A range answered under other validators than the file's first ones comes from another file;
    a validator that was there and is gone is a change too."""
    for name, was, now in (("ETag", f.etag, etag), ("Last-Modified", f.last_modified, last_modified)):
        if was is not None and now != was:
            now_text = clip(now, 80) if now is not None else "nothing (it vanished)"
            raise StorageError(f"{f.url}: {name} changed from {clip(was, 80)} to {now_text} while reading bytes "
                               f"{start}-{end - 1}; the file was replaced during the run")  # fmt: skip


class TransientFault(Exception):
    """A failure worth retrying (the message says what happened)."""


def small_file_limit(name: str) -> int:
    return SMALL_FILE_LIMITS.get(name, SMALL_FILE_LIMIT)


def parse_hf_location(location: str) -> tuple[str, str | None]:
    """``hf://ORG/MODEL[@REVISION]`` -> (repo id, revision or None)."""
    rest = location[len("hf://") :].rstrip("/")
    repo, at, revision = rest.partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or (at and not 0 < len(revision) <= 256):
        raise CheckpointError(f"{clip(location)}: expected hf://ORG/MODEL[@REVISION] naming a model repository's "
                              "root")  # fmt: skip
    return repo, revision if at else None



# -- requests with retries, many in flight ------------------------------------------------------

# A connection that takes this long to open met a full listen queue: the server dropped the SYN and
# the kernel resent it after its 1 s timeout. Simple servers (a backlog of 5) do this at 8 in flight.
SLOW_CONNECT_S = 0.9


class InFlight:
    """How many requests go out at once: at most ``most``, halved when the server shows strain (a
    transient fault, or a connection that took :data:`SLOW_CONNECT_S` to open) and raised by one
    after as many calm answers in a row as the limit. A server that cannot take ``max_in_flight``
    requests then costs one slow round, not a second on every step (1-2 s steps at 8 in flight
    against 0.055 s at 4 on Python's threading server). The limit changes only the order in which
    bytes arrive, never which bytes: results do not depend on it."""

    def __init__(self, most: int):
        self.most = self.limit = max(1, most)
        self.active = 0
        self.since_change = 0  # answers since the limit last changed
        self.lowered: list[str] = []  # why, each time it was halved
        self._ready: asyncio.Condition | None = None  # made on the loop that uses it

    async def __aenter__(self):
        self._ready = self._ready or asyncio.Condition()
        async with self._ready:
            await self._ready.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *_):
        async with self._ready:
            self.active -= 1
            self._ready.notify_all()

    def strained(self, why: str) -> None:
        # once per round of answers: a burst of faults from one overload halves the limit once
        if self.limit > 1 and (not self.lowered or self.since_change >= self.limit):
            self.lowered.append(f"{self.limit} -> {self.limit // 2}: {why}")
            self.limit //= 2
            self.since_change = 0

    def calm(self) -> None:
        self.since_change += 1
        if self.limit < self.most and self.since_change >= 2 * self.limit:
            self.limit += 1
            self.since_change = 0
            if self._ready is not None:
                asyncio.ensure_future(self._wake())

    async def _wake(self):
        async with self._ready:
            self._ready.notify_all()


class RemoteStore:
    """Runs a transport's requests on fsspec's I/O loop, with deadlines and retries, from any thread."""

    def __init__(self, transport, settings: RemoteSettings):
        self.fsspec_asyn = require("fsspec.asyn", "remote")
        self.transport = transport
        self.settings = settings
        self.loop = self.fsspec_asyn.get_loop()
        self.in_flight = InFlight(settings.max_in_flight)  # learnt over the whole run, not per step
        transport.strained = self.in_flight.strained

    def _sync(self, fn: Callable[..., Awaitable], *args):
        return self.fsspec_asyn.sync(self.loop, fn, *args)

    async def _retrying(self, what: str, nbytes: int, fn: Callable[..., Awaitable], *args):
        """``fn(*args)``, each attempt within its deadline (:func:`deadline_s` of ``nbytes``), retried
        on transient faults with backoff, all attempts together within (retries + 1) deadlines
        plus the backoff: a named StorageError when that is spent."""
        s = self.settings
        each = deadline_s(s, nbytes)
        started = time.monotonic()
        give_up = started + (s.retries + 1) * each + sum(s.backoff_s * 2**k * 1.5 for k in range(s.retries))
        attempt = 0
        while True:
            left = give_up - time.monotonic()
            try:
                if left <= 0:
                    raise TransientFault("no time left")
                answer = await asyncio.wait_for(fn(*args), min(each, left))
                self.in_flight.calm()
                return answer
            except (TransientFault, asyncio.TimeoutError) as e:
                fault = f"no complete answer within {min(each, left):.0f} s" if isinstance(e, asyncio.TimeoutError) \
                    else str(e)  # fmt: skip
                self.in_flight.strained(fault)
                pause = s.backoff_s * 2**attempt * (0.5 + random.random())
                if attempt >= s.retries or time.monotonic() + pause >= give_up:
                    raise StorageError(f"{what}: failed after {attempt + 1} attempt(s): {fault} (gave up after "
                                       f"{time.monotonic() - started:.0f} s)") from None  # fmt: skip
                attempt += 1
                await asyncio.sleep(pause)

    def get_small(self, name: str) -> bytes | None:
        limit = small_file_limit(name)
        return self._sync(self._retrying, self.transport.url(name), limit, self.transport.get_small, name)

    def get_url(self, url: str, limit: int) -> bytes | None:
        return self._sync(self._retrying, url, limit, self.transport.get_url, url, limit)

    def stat_all(self, names: list[str]) -> list[RemoteFile]:
        async def all_of() -> list[RemoteFile]:
            async def one(name: str) -> RemoteFile:
                async with self.in_flight:
                    return await self._retrying(self.transport.url(name), 0, self.transport.stat, name)

            return list(await asyncio.gather(*(one(n) for n in names)))

        return self._sync(all_of)

    def read_ranges(self, pieces: list[tuple[RemoteFile, int, int, str]]) -> list[bytes]:
        """The bytes ``[start, end)`` of each ``(file, start, end, tensor)`` piece, at most
        ``max_in_flight`` requests at a time; a failure names URL, range and tensor."""

        async def all_of() -> list[bytes]:
            async def one(f: RemoteFile, start: int, end: int, tensor: str) -> bytes:
                async with self.in_flight:
                    try:
                        return await self._retrying(f"{f.url}: bytes {start}-{end - 1}", end - start,
                                                    self.transport.read_range, f, start, end)  # fmt: skip
                    except StorageError as e:
                        raise StorageError(f"{e} (reading tensor {tensor!r})") from None

            tasks = [asyncio.ensure_future(one(*p)) for p in pieces]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:  # on the first failure, stop the others instead of leaving them running
                    t.cancel()

        return self._sync(all_of)

    def close(self) -> None:
        try:
            self._sync(self.transport.close)
        except Exception:  # closing a session that the loop already dropped
            pass


# -- naming what the user wrote --------------------------------------------------------------------


def normalised_location(location: str) -> str:
    """A remote location as the run records it, without what does not change which files it names:
    trailing slashes. Local paths are returned as they are."""
    return location.rstrip("/") if is_remote(location) else location


def same_checkpoint(written: str, recorded: str) -> bool:
    """Whether a ledger's recorded checkpoint location is the one a manifest wrote: equal once
    normalised, or for ``hf://`` the same repository with the recorded revision a commit that the
    written one names (no revision, a branch or tag: resolved to it at run time; a commit: it)."""
    if not (isinstance(written, str) and isinstance(recorded, str)):
        return written == recorded
    a, b = normalised_location(written), normalised_location(recorded)
    if a == b or not (a.startswith("hf://") and b.startswith("hf://")):
        return a == b
    try:
        (repo_a, rev_a), (repo_b, rev_b) = parse_hf_location(a), parse_hf_location(b)
    except KimiJaxError:
        return False
    if repo_a != repo_b or rev_b is None or not COMMIT_PATTERN.fullmatch(rev_b):
        return False
    return rev_a is None or rev_a == rev_b or not COMMIT_PATTERN.fullmatch(rev_a)


def relocated(error: KimiJaxError, mirror: Path, location: str) -> KimiJaxError:
    """``error`` with the local mirror folder in its message replaced by the remote location."""
    text = str(error).replace(f"{mirror}{os.sep}", f"{normalised_location(location)}/").replace(str(mirror), location)
    return type(error)(text)
