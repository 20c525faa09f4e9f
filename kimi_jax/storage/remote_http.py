"""HTTP(S) range reads, also of the Hub's resolve URLs (see :mod:`kimi_jax.storage.remote` for what a
server may do and what then happens). aiohttp is used directly rather than fsspec's
``HTTPFileSystem``, because each response must be judged before its body is read."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import quote

from kimi_jax.errors import CheckpointError, StorageError
from kimi_jax.storage.remote import (
    COMMIT_PATTERN,
    SLOW_CONNECT_S,
    API_LIMIT,
    RemoteFile,
    RemoteSettings,
    RemoteStore,
    TransientFault,
    check_validators,
    clip,
    parse_hf_location,
    require,
    small_file_limit,
)


class HttpTransport:
    def __init__(self, base_url: str, settings: RemoteSettings, headers: dict[str, str] | None = None):
        self.aiohttp = require("aiohttp", "http(s)://")
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.settings = settings
        # identity: the bytes must be the file's, never a compressed form of them
        self.headers = {"Accept-Encoding": "identity", **(headers or {})}
        self._session = None
        self.strained = lambda why: None  # the store's InFlight.strained, told of slow connections

    def url(self, name: str) -> str:
        return self.base + quote(name)

    async def session(self):
        if self._session is None:
            aiohttp = self.aiohttp
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.timeout_s,
                                            sock_read=self.settings.timeout_s)  # fmt: skip
            connector = aiohttp.TCPConnector(limit=max(1, self.settings.max_in_flight))
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self.headers,
                                                  auto_decompress=False, trace_configs=[self._connect_clock()])  # fmt: skip
        return self._session

    def _connect_clock(self):
        """Times each new connection: one that takes SLOW_CONNECT_S met a full listen queue."""
        trace, loop_time = self.aiohttp.TraceConfig(), asyncio.get_running_loop().time

        async def start(_session, context, _params):
            context.connect_started = loop_time()

        async def end(_session, context, _params):
            took = loop_time() - getattr(context, "connect_started", loop_time())
            if took >= SLOW_CONNECT_S:
                self.strained(f"a connection took {took:.1f} s to open (the server's listen queue was full)")

        trace.on_connection_create_start.append(start)
        trace.on_connection_create_end.append(end)
        return trace

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
    if not isinstance(commit, str) or not COMMIT_PATTERN.fullmatch(commit):
        raise CheckpointError(f"{clip(location)}: the Hub answered revision {clip(revision, 60)!r} with "
                              f"{clip(repr(commit), 60)}, which is not a commit (40 hex digits)")  # fmt: skip
    base = f"{endpoint}/{repo}/resolve/{commit}/"
    return HttpTransport(base, settings, headers), f"hf://{repo}@{commit}"


