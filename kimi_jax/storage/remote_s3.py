"""``s3://`` range reads through s3fs (see :mod:`kimi_jax.storage.remote` for the bounds)."""

from __future__ import annotations

import os

from kimi_jax.errors import StorageError
from kimi_jax.storage.remote import (
    RemoteFile,
    RemoteSettings,
    TransientFault,
    check_validators,
    clip,
    require,
    small_file_limit,
)


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


