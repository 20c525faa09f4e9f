"""Byte ranges of a remote checkpoint: ``http(s)://``, ``hf://org/model[@revision]`` and ``s3://bucket/prefix``.

Every request runs on fsspec's I/O event loop, so many can be in flight at once
(``RemoteSettings.max_in_flight``) while the engine's threads wait for them. ``s3://`` goes through
s3fs. ``hf://`` is resolved by huggingface_hub (``HfFileSystem`` parses the path and checks the
repository and revision, ``HfApi`` pins the revision to its commit) to the Hub's ``resolve`` URLs,
which are then read like any HTTP folder. HTTP ranges use aiohttp directly rather than fsspec's
``HTTPFileSystem``, because each response must be judged before its body is read: a server that
answers a range request with the whole file (HTTP 200) is cut off at once, never read to the end,
and the ``ETag`` and ``Content-Range`` of every response are compared with what was asked.

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
from urllib.parse import quote

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
_COMMIT = re.compile(r"[0-9a-f]{40}")
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


# -- HTTP (also the Hub's resolve URLs) ---------------------------------------------------------


class HttpTransport:
    def __init__(self, base_url: str, settings: RemoteSettings, headers: dict[str, str] | None = None):
        self.aiohttp = require("aiohttp", "http(s)://")
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.settings = settings
        # identity: the bytes must be the file's, never a compressed form of them
        self.headers = {"Accept-Encoding": "identity", **(headers or {})}
        self._session = None

    def url(self, name: str) -> str:
        return self.base + quote(name)

    async def session(self):
        if self._session is None:
            aiohttp = self.aiohttp
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeout_s,
                                            sock_read=self.settings.timeout_s)  # fmt: skip
            connector = aiohttp.TCPConnector(limit=max(1, self.settings.max_in_flight))
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self.headers,
                                                  auto_decompress=False)  # fmt: skip
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _status(self, url: str, status: int, what: str) -> None:
        if status == 429 or status >= 500:
            raise TransientFault(f"HTTP {status}")
        if status in (401, 403):
            raise StorageError(f"{url}: HTTP {status} {what}: access denied (for the Hub, log in or set HF_TOKEN)")
        raise StorageError(f"{url}: HTTP {status} {what}")

    @staticmethod
    def _identity(url: str, r) -> None:
        encoding = r.headers.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            r.close()
            raise StorageError(f"{url}: the server sent the body with Content-Encoding {clip(encoding, 40)!r}, though "
                               "only identity was asked for; kimi-jax reads a file's own bytes (serve the checkpoint "
                               "uncompressed)")  # fmt: skip

    async def get_small(self, name: str) -> bytes | None:
        return await self.get_url(self.url(name), small_file_limit(name))

    async def get_url(self, url: str, limit: int) -> bytes | None:
        """The body of ``url`` (None for HTTP 404), streamed through ``limit`` bytes."""
        try:
            return await self._get_url(url, limit)
        except (self.aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None

    async def _get_url(self, url: str, limit: int) -> bytes | None:
        async with (await self.session()).get(url) as r:
            if r.status == 404:
                return None
            if r.status != 200:
                self._status(url, r.status, "fetching the file")
            self._identity(url, r)
            declared = r.headers.get("Content-Length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                r.close()
                raise StorageError(f"{url}: Content-Length {clip(declared, 30)}: more than the {limit:,} bytes such a "
                                   "file can legitimately hold")  # fmt: skip
            body = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    r.close()
                    raise StorageError(f"{url}: the body runs past {limit:,} bytes, more than such a file can "
                                       "legitimately hold; it was cut off")  # fmt: skip
            if declared is not None and len(body) != int(declared):
                raise TransientFault(f"short body: {len(body)} of {declared} bytes")
            return bytes(body)

    async def stat(self, name: str) -> RemoteFile:
        try:
            return await self._stat(name, self.url(name))
        except (self.aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None

    async def _stat(self, name: str, url: str) -> RemoteFile:
        async with (await self.session()).head(url, allow_redirects=True) as r:
            if r.status == 404:
                raise StorageError(f"{url}: not found (HTTP 404); the index names this shard")
            if r.status != 200:
                self._status(url, r.status, "asking for the file's size")
            length = r.headers.get("Content-Length")
            if length is None or not length.isdigit() or len(length) > 18:
                raise StorageError(f"{url}: the server gives no usable Content-Length ({clip(length, 30)}); range "
                                   "reads need the file's size")  # fmt: skip
            return RemoteFile(name, url, int(length), r.headers.get("ETag"), r.headers.get("Last-Modified"))

    async def read_range(self, f: RemoteFile, start: int, end: int) -> bytes:
        aiohttp, n = self.aiohttp, end - start
        try:
            async with (await self.session()).get(f.url, headers={"Range": f"bytes={start}-{end - 1}"}) as r:
                if r.status == 200:
                    r.close()  # drop the connection: the whole file is on its way
                    size = clip(r.headers.get("Content-Length", "unknown"), 30)
                    raise StorageError(f"{f.url}: the server ignored the Range header (HTTP 200 for bytes {start}-"
                                       f"{end - 1}) and began sending the whole file ({size} bytes); it was cut off. "
                                       "Serve the checkpoint from a server that supports range requests")  # fmt: skip
                if r.status != 206:
                    self._status(f.url, r.status, f"for bytes {start}-{end - 1}")
                self._identity(f.url, r)
                try:
                    check_validators(f, r.headers.get("ETag"), r.headers.get("Last-Modified"), start, end)
                except StorageError:
                    r.close()
                    raise
                content_range = r.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-{end - 1}/"):
                    r.close()
                    raise StorageError(f"{f.url}: asked for bytes {start}-{end - 1}, the server sent Content-Range "
                                       f"{clip(content_range, 80)!r}")  # fmt: skip
                try:
                    return await r.content.readexactly(n)
                except asyncio.IncompleteReadError as e:
                    raise TransientFault(f"short body: {len(e.partial)} of {n} bytes") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None


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


def hf_transport(location: str, settings: RemoteSettings) -> tuple[HttpTransport, str]:
    """``hf://org/model[@revision]`` -> a transport on ``ENDPOINT/org/model/resolve/COMMIT/`` and the
    pinned location ``hf://org/model@COMMIT``. The endpoint is ``$HF_ENDPOINT`` or the Hub; the
    revision is resolved with one bounded request to the Hub's revision API, and must come back as
    a commit (40 hex digits)."""
    hub = require("huggingface_hub", "hf://")
    repo, revision = parse_hf_location(location)
    endpoint = (os.environ.get("HF_ENDPOINT") or hub.constants.ENDPOINT).rstrip("/")
    token = hub.get_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    revision = revision or "main"
    api = f"{endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
    probe = RemoteStore(HttpTransport(endpoint, settings, headers), settings)
    try:
        answer = probe.get_url(api, API_LIMIT)
    except StorageError as e:
        raise CheckpointError(f"{clip(location)}: revision {clip(revision, 60)!r} of {repo} could not be resolved "
                              f"({clip(e, 300)})") from None  # fmt: skip
    finally:
        probe.close()
    if answer is None:
        raise CheckpointError(f"{clip(location)}: not a Hub repository and revision that can be read ({api}: HTTP 404)")
    from kimi_jax.fileio import parse_json

    info = parse_json(answer, api, CheckpointError)
    commit = info.get("sha") if isinstance(info, dict) else None
    if not commit:
        raise CheckpointError(f"{clip(location)}: the Hub gave no commit for revision {clip(revision, 60)!r}")
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise CheckpointError(f"{clip(location)}: the Hub answered revision {clip(revision, 60)!r} with "
                              f"{clip(repr(commit), 60)}, which is not a commit (40 hex digits)")  # fmt: skip
    base = f"{endpoint}/{repo}/resolve/{commit}/"
    return HttpTransport(base, settings, headers), f"hf://{repo}@{commit}"


# -- S3 -----------------------------------------------------------------------------------------


class S3Transport:
    """``s3://bucket/prefix`` through s3fs; the endpoint is ``$AWS_ENDPOINT_URL_S3`` or
    ``$AWS_ENDPOINT_URL`` when set (another S3-protocol server), credentials as botocore finds them.
    botocore's and s3fs's own retries are switched off: one request is one attempt, and
    :class:`RemoteStore` retries within its deadline."""

    def __init__(self, location: str, settings: RemoteSettings):
        s3fs = require("s3fs", "s3://")
        self.prefix = location[len("s3://") :].rstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                                    config_kwargs={"connect_timeout": settings.timeout_s,
                                                   "read_timeout": settings.timeout_s,
                                                   "retries": {"total_max_attempts": 1, "mode": "standard"}})  # fmt: skip
        self.fs.retries = 1

    def url(self, name: str) -> str:
        return f"s3://{self.prefix}/{name}"

    async def _get(self, url: str, **kwargs):
        bucket, key, _ = self.fs.split_path(url)
        return await self.fs._call_s3("get_object", Bucket=bucket, Key=key, **kwargs)

    @staticmethod
    async def _read(resp, n: int, url: str) -> bytes:
        body = bytearray()
        try:
            while len(body) <= n:  # at most one byte past what may come: enough to know it is too much
                chunk = await resp["Body"].read(min(1 << 20, n + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
        except Exception as e:
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None
        finally:
            resp["Body"].close()
        return bytes(body)

    async def get_small(self, name: str) -> bytes | None:
        url, limit = self.url(name), small_file_limit(name)
        try:
            resp = await self._get(url)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None
        declared = resp.get("ContentLength")
        if isinstance(declared, int) and declared > limit:
            resp["Body"].close()
            raise StorageError(f"{url}: {declared:,} bytes, more than the {limit:,} such a file can legitimately hold")
        body = await self._read(resp, limit, url)
        if len(body) > limit:
            raise StorageError(f"{url}: the body runs past {limit:,} bytes, more than such a file can legitimately "
                               "hold; it was cut off")  # fmt: skip
        return body

    async def stat(self, name: str) -> RemoteFile:
        try:
            info = await self.fs._info(self.url(name))
        except FileNotFoundError:
            raise StorageError(f"{self.url(name)}: not found; the index names this shard") from None
        except OSError as e:
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None
        size = info.get("size")
        if type(size) is not int or size < 0:
            raise StorageError(f"{self.url(name)}: the server gives no usable size ({clip(repr(size), 40)})")
        return RemoteFile(name, self.url(name), size, info.get("ETag"))

    async def read_range(self, f: RemoteFile, start: int, end: int) -> bytes:
        match = {"IfMatch": f.etag} if f.etag else {}
        try:
            resp = await self._get(f.url, Range=f"bytes={start}-{end - 1}", **match)
        except Exception as e:
            if any(s in str(e) for s in ("PreconditionFailed", "pre-conditions", "412")):
                raise StorageError(f"{f.url}: ETag is no longer {clip(f.etag, 80)} while reading bytes {start}-"
                                   f"{end - 1}; the object was replaced during the run") from None  # fmt: skip
            raise TransientFault(f"{type(e).__name__}: {clip(e, 200)}") from None
        content_range = resp.get("ContentRange") or ""
        if not content_range.startswith(f"bytes {start}-{end - 1}/"):
            resp["Body"].close()
            raise StorageError(f"{f.url}: asked for bytes {start}-{end - 1}, the server sent Content-Range "
                               f"{clip(content_range, 80)!r}")  # fmt: skip
        try:
            check_validators(f, resp.get("ETag"), None, start, end)
        except StorageError:
            resp["Body"].close()
            raise
        body = await self._read(resp, end - start, f.url)
        if len(body) != end - start:
            raise TransientFault(f"short body: {len(body)} of {end - start} bytes")
        return body

    async def close(self) -> None:
        pass


def open_transport(location: str, settings: RemoteSettings):
    """(transport, location with any revision pinned) for a remote checkpoint folder."""
    if location.startswith("hf://"):
        return hf_transport(location, settings)
    if location.startswith("s3://"):
        return S3Transport(location, settings), location.rstrip("/")
    return HttpTransport(location, settings), location.rstrip("/")


# -- requests with retries, many in flight ------------------------------------------------------


class RemoteStore:
    """Runs a transport's requests on fsspec's I/O loop, with deadlines and retries, from any thread."""

    def __init__(self, transport, settings: RemoteSettings):
        self.fsspec_asyn = require("fsspec.asyn", "remote")
        self.transport = transport
        self.settings = settings
        self.loop = self.fsspec_asyn.get_loop()

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
                return await asyncio.wait_for(fn(*args), min(each, left))
            except (TransientFault, asyncio.TimeoutError) as e:
                fault = f"no complete answer within {min(each, left):.0f} s" if isinstance(e, asyncio.TimeoutError) \
                    else str(e)  # fmt: skip
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
            limit = asyncio.Semaphore(max(1, self.settings.max_in_flight))

            async def one(name: str) -> RemoteFile:
                async with limit:
                    return await self._retrying(self.transport.url(name), 0, self.transport.stat, name)

            return list(await asyncio.gather(*(one(n) for n in names)))

        return self._sync(all_of)

    def read_ranges(self, pieces: list[tuple[RemoteFile, int, int, str]]) -> list[bytes]:
        """The bytes ``[start, end)`` of each ``(file, start, end, tensor)`` piece, at most
        ``max_in_flight`` requests at a time; a failure names URL, range and tensor."""

        async def all_of() -> list[bytes]:
            limit = asyncio.Semaphore(max(1, self.settings.max_in_flight))

            async def one(f: RemoteFile, start: int, end: int, tensor: str) -> bytes:
                async with limit:
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
    if repo_a != repo_b or rev_b is None or not _COMMIT.fullmatch(rev_b):
        return False
    return rev_a is None or rev_a == rev_b or not _COMMIT.fullmatch(rev_a)


def relocated(error: KimiJaxError, mirror: Path, location: str) -> KimiJaxError:
    """``error`` with the local mirror folder in its message replaced by the remote location."""
    text = str(error).replace(f"{mirror}{os.sep}", f"{normalised_location(location)}/").replace(str(mirror), location)
    return type(error)(text)
