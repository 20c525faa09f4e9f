"""A static HTTP server on 127.0.0.1 with Range support and injectable faults, for the remote tests.

Why our own (a small ``http.server`` subclass) rather than nginx: the tests must make the server
misbehave on cue (drop a connection mid-range, answer 503 then recover, send a short body, ignore
Range, serve other bytes, change or drop the ETag, compress, trickle, stall, send a body without
end) and count exactly which ranges were asked for; a stdlib server started inside the test does
all of that with no service to install or start in CI.

Only single ranges (``bytes=A-B``) are implemented: that is all a range reader sends.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")


class Faults:
    """What the server does wrong next. Counters are decremented as faults are served."""

    def __init__(self) -> None:
        self.status: list[int] = []  # answer the next range requests with these statuses
        self.drop = 0  # next N range requests: send half the body, then close the connection
        self.short = 0  # next N range requests: a Content-Length and body 16 bytes short
        self.ignore_range = False  # answer range requests with HTTP 200 and the whole file
        self.huge_body = 0  # with ignore_range: claim (and start streaming) this many bytes instead
        self.flip: tuple[str, int] | None = None  # (file name, absolute offset): serve that byte inverted
        self.etag_change_after: int | None = None  # after N range requests, the ETag changes
        self.delay_s = 0.0  # wait this long before answering each range request (to see requests overlap)
        self.etag_vanish_after: int | None = None  # after N range requests, answer without an ETag
        self.encoding: str | None = None  # send range bodies with this Content-Encoding header
        self.trickle_s = 0.0  # send range bodies one byte per this many seconds
        self.stall_s = 0.0  # wait this long before answering any request at all
        self.endless: set[str] = set()  # these paths: HTTP 200, no Content-Length, zeros until the client hangs up
        self.trickle_routes_s = 0.0  # send the JSON routes one byte per this many seconds
        # rewrite(request path, status, headers, body) -> (status, headers, body): any answer, as the fuzzer likes
        self.rewrite: Callable[[str, int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]] | None = None


class RangeServer:
    def __init__(self, resolve: Callable[[str], Path | None], routes: dict[str, object] | None = None):
        self.resolve = resolve
        self.routes = routes or {}  # exact path -> JSON body
        self.faults = Faults()
        self.lock = threading.Lock()
        self.ranges: list[tuple[str, int, int]] = []  # (path, start, end exclusive) of every range GET served
        self.requests = 0
        self.body_bytes_sent = 0
        self.active = 0  # requests being answered right now, and the most at once
        self.max_active = 0
        self.request_headers: list[dict[str, str]] = []  # of every request, in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
                if server.faults.rewrite is not None:
                    status, headers, body = server.faults.rewrite(self.path, status, dict(headers), body)
                    self.close_connection = True  # a Content-Length that lies must not confuse the next request
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)
                    with server.lock:
                        server.body_bytes_sent += len(body)

            def _serve(self, head: bool) -> None:
                with server.lock:
                    server.requests += 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self._answer(head)
                finally:
                    with server.lock:
                        server.active -= 1

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.request_headers.append(dict(self.headers.items()))
                time.sleep(server.faults.stall_s)
                if path in server.faults.endless:
                    self._endless()
                    return
                if path in server.routes:
                    body = json.dumps(server.routes[path]).encode()
                    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
                    if server.faults.trickle_routes_s and not head:
                        self.send_response(200)
                        for k, v in headers.items():
                            self.send_header(k, v)
                        self.end_headers()
                        self._dribble(body, server.faults.trickle_routes_s)
                        return
                    self._send(200, headers, body, head)
                    return
                file = server.resolve(path)
                if file is None or not file.is_file():
                    self._send(404, {"Content-Length": "0"}, head=head)
                    return
                size = file.stat().st_size
                etag = f'"{size}-{file.name}"'
                m = RANGE_RE.match(self.headers.get("Range", ""))
                if m is None or head:
                    self._send(200, {"Content-Length": str(size), "ETag": etag, "Accept-Ranges": "bytes"},
                               b"" if head else file.read_bytes(), head)  # fmt: skip
                    return
                start, end = int(m.group(1)), int(m.group(2)) + 1
                faults = server.faults
                with server.lock:
                    server.ranges.append((path, start, end))
                    served = len(server.ranges)
                    status = faults.status.pop(0) if faults.status else None
                    drop = faults.drop > 0
                    faults.drop -= 1 if drop else 0
                    short = faults.short > 0 and not drop
                    faults.short -= 1 if short else 0
                time.sleep(faults.delay_s)
                if faults.etag_change_after is not None and served > faults.etag_change_after:
                    etag = '"replaced"'
                if faults.etag_vanish_after is not None and served > faults.etag_vanish_after:
                    etag = None
                if status is not None:
                    self._send(status, {"Content-Length": "0"})
                    return
                if faults.ignore_range:
                    self._whole_file(size, etag)
                    return
                with open(file, "rb") as f:
                    f.seek(start)
                    body = bytearray(f.read(end - start))
                if faults.flip and path.endswith("/" + faults.flip[0]) and start <= faults.flip[1] < end:
                    body[faults.flip[1] - start] ^= 0xFF
                headers = {"Content-Range": f"bytes {start}-{end - 1}/{size}", "ETag": etag}
                if etag is None:
                    del headers["ETag"]
                if faults.encoding:
                    headers["Content-Encoding"] = faults.encoding
                if faults.trickle_s:
                    self._trickle(headers, bytes(body))
                    return
                if drop:
                    headers["Content-Length"] = str(len(body))
                    self._send(206, headers, bytes(body[: len(body) // 2]))
                    self.close_connection = True
                    return
                if short:
                    body = body[:-16]
                headers["Content-Length"] = str(len(body))
                self._send(206, headers, bytes(body))

            def _trickle(self, headers: dict[str, str], body: bytes) -> None:
                self.send_response(206)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self._dribble(body, server.faults.trickle_s)

            def _dribble(self, body: bytes, every_s: float) -> None:
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(every_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def _endless(self) -> None:
                self.send_response(200)
                self.end_headers()  # no Content-Length: the body ends when the connection does
                block, sent = bytes(1 << 16), 0
                try:  # bounded: stops when the client hangs up, or after 256 MiB at most
                    while sent < 256 << 20:
                        self.wfile.write(block)
                        sent += len(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                with server.lock:
                    server.body_bytes_sent += sent
                self.close_connection = True

            def _whole_file(self, size: int, etag: str) -> None:
                size = server.faults.huge_body or size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("ETag", etag)
                self.end_headers()
                block = bytes(1 << 16)
                sent = 0
                try:  # bounded: stops when the client hangs up, or after 256 MiB at most
                    while sent < min(size, 256 << 20):
                        self.wfile.write(block)
                        sent += len(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                with server.lock:
                    server.body_bytes_sent += sent
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "RangeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def folder_server(root: Path, prefix: str = "/ckpt/") -> RangeServer:
    """Serve the files of ``root`` under ``prefix``."""
    root = Path(root)

    def resolve(path: str) -> Path | None:
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :]
        return root / rel if rel and "/" not in rel and ".." not in rel else None

    return RangeServer(resolve)
