"""Byte ranges of a remote checkpoint: ``http(s)://``, ``hf://org/model[@revision]`` and ``s3://bucket/prefix``.

Every request runs on fsspec's I/O event loop, so many can be in flight at once
(``RemoteSettings.max_in_flight``) while the engine's threads wait for them. ``s3://`` goes through
s3fs. ``hf://`` is resolved by huggingface_hub (``HfFileSystem`` parses the path and checks the
repository and revision, ``HfApi`` pins the revision to its commit) to the Hub's ``resolve`` URLs,
which are then read like any HTTP folder. HTTP ranges use aiohttp directly rather than fsspec's
``HTTPFileSystem``, because each response must be judged before its body is read: a server that
answers a range request with the whole file (HTTP 200) is cut off at once, never read to the end,
and the ``ETag`` and ``Content-Range`` of every response are compared with what was asked.

Transient failures (dropped connections, HTTP 429/5xx, short bodies, timeouts) are retried with
exponential backoff and jitter; a persistent one, a changed ETag or an ignored Range is a
:class:`~kimi_jax.errors.StorageError` naming the URL and the byte range (the reader adds the tensor).
These packages are the optional ``remote`` extra; without them a remote checkpoint is a clear error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import random
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

from kimi_jax.errors import CheckpointError, StorageError

REMOTE_SCHEMES = ("http://", "https://", "hf://", "s3://")
SMALL_FILE_LIMIT = 512 << 20  # config, index, tokenizer, digest file: never more than this


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


class TransientFault(Exception):
    """A failure worth retrying (the message says what happened)."""


# -- HTTP (also the Hub's resolve URLs) ---------------------------------------------------------


class HttpTransport:
    def __init__(self, base_url: str, settings: RemoteSettings, headers: dict[str, str] | None = None):
        self.aiohttp = require("aiohttp", "http(s)://")
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.settings = settings
        self.headers = headers or {}
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

    async def get_small(self, name: str) -> bytes | None:
        try:
            return await self._get_small(self.url(name))
        except (self.aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise TransientFault(f"{type(e).__name__}: {e}") from None

    async def _get_small(self, url: str) -> bytes | None:
        async with (await self.session()).get(url) as r:
            if r.status == 404:
                return None
            if r.status != 200:
                self._status(url, r.status, "fetching the file")
            if int(r.headers.get("Content-Length") or 0) > SMALL_FILE_LIMIT:
                raise StorageError(f"{url}: {r.headers['Content-Length']} bytes, too large for a checkpoint "
                                   "metadata file")  # fmt: skip
            return await r.read()

    async def stat(self, name: str) -> RemoteFile:
        try:
            return await self._stat(name, self.url(name))
        except (self.aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise TransientFault(f"{type(e).__name__}: {e}") from None

    async def _stat(self, name: str, url: str) -> RemoteFile:
        async with (await self.session()).head(url, allow_redirects=True) as r:
            if r.status == 404:
                raise StorageError(f"{url}: not found (HTTP 404); the index names this shard")
            if r.status != 200:
                self._status(url, r.status, "asking for the file's size")
            length = r.headers.get("Content-Length")
            if length is None:
                raise StorageError(f"{url}: the server gives no Content-Length; range reads need the file's size")
            return RemoteFile(name, url, int(length), r.headers.get("ETag"))

    async def read_range(self, f: RemoteFile, start: int, end: int) -> bytes:
        aiohttp, n = self.aiohttp, end - start
        try:
            async with (await self.session()).get(f.url, headers={"Range": f"bytes={start}-{end - 1}"}) as r:
                if r.status == 200:
                    r.close()  # drop the connection: the whole file is on its way
                    size = r.headers.get("Content-Length", "unknown")
                    raise StorageError(f"{f.url}: the server ignored the Range header (HTTP 200 for bytes {start}-"
                                       f"{end - 1}) and began sending the whole file ({size} bytes); it was cut off. "
                                       "Serve the checkpoint from a server that supports range requests")  # fmt: skip
                if r.status != 206:
                    self._status(f.url, r.status, f"for bytes {start}-{end - 1}")
                etag = r.headers.get("ETag")
                if f.etag is not None and etag is not None and etag != f.etag:
                    r.close()
                    raise StorageError(f"{f.url}: ETag changed from {f.etag} to {etag} while reading bytes {start}-"
                                       f"{end - 1}; the file was replaced during the run")  # fmt: skip
                content_range = r.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-{end - 1}/"):
                    r.close()
                    raise StorageError(f"{f.url}: asked for bytes {start}-{end - 1}, the server sent Content-Range "
                                       f"{content_range!r}")  # fmt: skip
                try:
                    return await r.content.readexactly(n)
                except asyncio.IncompleteReadError as e:
                    raise TransientFault(f"short body: {len(e.partial)} of {n} bytes") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise TransientFault(f"{type(e).__name__}: {e}") from None


def hf_transport(location: str, settings: RemoteSettings) -> tuple[HttpTransport, str]:
    """``hf://org/model[@revision]`` -> a transport on ``ENDPOINT/org/model/resolve/COMMIT/`` and the
    pinned location ``hf://org/model@COMMIT``. The endpoint is ``$HF_ENDPOINT`` or the Hub."""
    hub = require("huggingface_hub", "hf://")
    endpoint = (os.environ.get("HF_ENDPOINT") or hub.constants.ENDPOINT).rstrip("/")
    token = hub.get_token()
    fs = hub.HfFileSystem(endpoint=endpoint, token=token)
    try:
        resolved = fs.resolve_path(location.rstrip("/"))
    except Exception as e:  # the hub client raises many kinds for a missing repo or revision
        raise CheckpointError(f"{location}: not a Hub repository and revision that can be read "
                              f"({type(e).__name__}: {str(e)[:200]})") from None  # fmt: skip
    if resolved.repo_type != "model" or resolved.path_in_repo:
        raise CheckpointError(f"{location}: expected hf://ORG/MODEL[@REVISION] naming a model repository's root")
    revision = resolved.revision or "main"
    try:
        commit = hub.HfApi(endpoint=endpoint, token=token).model_info(resolved.repo_id, revision=revision).sha
    except Exception as e:  # the hub client raises many kinds for a missing repo or revision
        raise CheckpointError(f"{location}: revision {revision!r} of {resolved.repo_id} could not be resolved "
                              f"({type(e).__name__}: {str(e)[:200]})") from None  # fmt: skip
    if not commit:
        raise CheckpointError(f"{location}: the Hub gave no commit for revision {revision!r}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = f"{endpoint}/{resolved.repo_id}/resolve/{commit}/"
    return HttpTransport(base, settings, headers), f"hf://{resolved.repo_id}@{commit}"


# -- S3 -----------------------------------------------------------------------------------------


class S3Transport:
    """``s3://bucket/prefix`` through s3fs; the endpoint is ``$AWS_ENDPOINT_URL_S3`` or
    ``$AWS_ENDPOINT_URL`` when set (another S3-protocol server), credentials as botocore finds them."""

    def __init__(self, location: str, settings: RemoteSettings):
        s3fs = require("s3fs", "s3://")
        self.prefix = location[len("s3://") :].rstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                                    config_kwargs={"connect_timeout": settings.timeout_s,
                                                   "read_timeout": settings.timeout_s})  # fmt: skip

    def url(self, name: str) -> str:
        return f"s3://{self.prefix}/{name}"

    async def get_small(self, name: str) -> bytes | None:
        try:
            return await self.fs._cat_file(self.url(name))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransientFault(f"{type(e).__name__}: {e}") from None

    async def stat(self, name: str) -> RemoteFile:
        try:
            info = await self.fs._info(self.url(name))
        except FileNotFoundError:
            raise StorageError(f"{self.url(name)}: not found; the index names this shard") from None
        except OSError as e:
            raise TransientFault(f"{type(e).__name__}: {e}") from None
        return RemoteFile(name, self.url(name), int(info["size"]), info.get("ETag"))

    async def read_range(self, f: RemoteFile, start: int, end: int) -> bytes:
        bucket, key, _ = self.fs.split_path(f.url)
        match = {"IfMatch": f.etag} if f.etag else {}
        try:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                          **match)  # fmt: skip
        except Exception as e:
            if any(s in str(e) for s in ("PreconditionFailed", "pre-conditions", "412")):
                raise StorageError(f"{f.url}: ETag is no longer {f.etag} while reading bytes {start}-{end - 1}; "
                                   "the object was replaced during the run") from None  # fmt: skip
            raise TransientFault(f"{type(e).__name__}: {e}") from None
        try:
            body = await resp["Body"].read()
        except Exception as e:
            raise TransientFault(f"{type(e).__name__}: {e}") from None
        finally:
            resp["Body"].close()
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
    """Runs a transport's requests on fsspec's I/O loop, with retries, from any thread."""

    def __init__(self, transport, settings: RemoteSettings):
        self.fsspec_asyn = require("fsspec.asyn", "remote")
        self.transport = transport
        self.settings = settings
        self.loop = self.fsspec_asyn.get_loop()

    def _sync(self, fn: Callable[..., Awaitable], *args):
        return self.fsspec_asyn.sync(self.loop, fn, *args)

    async def _retrying(self, what: str, fn: Callable[..., Awaitable], *args):
        attempt = 0
        while True:
            try:
                return await fn(*args)
            except TransientFault as e:
                if attempt >= self.settings.retries:
                    raise StorageError(f"{what}: failed after {attempt + 1} attempt(s): {e}") from None
                attempt += 1
                await asyncio.sleep(self.settings.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))

    def get_small(self, name: str) -> bytes | None:
        return self._sync(self._retrying, self.transport.url(name), self.transport.get_small, name)

    def stat_all(self, names: list[str]) -> list[RemoteFile]:
        async def all_of() -> list[RemoteFile]:
            limit = asyncio.Semaphore(max(1, self.settings.max_in_flight))

            async def one(name: str) -> RemoteFile:
                async with limit:
                    return await self._retrying(self.transport.url(name), self.transport.stat, name)

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
                        return await self._retrying(f"{f.url}: bytes {start}-{end - 1}", self.transport.read_range,
                                                    f, start, end)  # fmt: skip
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
