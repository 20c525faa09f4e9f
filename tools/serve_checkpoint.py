"""Serve a checkpoint folder over HTTP with Range support, for `model.checkpoint: http://...`.

    python tools/serve_checkpoint.py CHECKPOINT_DIR [--host 127.0.0.1] [--port 8080]

Why this exists: Python's own `python3 -m http.server` ignores Range (kimi-jax cuts such a server
off at once, since it would send whole shards), and a newcomer should not need nginx to try the
remote path. This one answers HEAD and single `bytes=A-B` ranges with ETag and Last-Modified,
keeps connections open (HTTP/1.1) and has a listen queue deep enough for kimi-jax's requests in
flight. It serves only the regular files directly inside the folder, read-only, and nothing else.
For anything beyond a local trial use nginx or Caddy: both honour Range as they are.
"""

from __future__ import annotations

import argparse
import email.utils
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RANGE = re.compile(r"bytes=(\d{1,18})-(\d{1,18})?")


class CheckpointServer(ThreadingHTTPServer):
    request_queue_size = 128  # Python's default of 5 drops connections at 8 requests in flight
    daemon_threads = True

    def __init__(self, address, root: Path):
        self.root = root.resolve()
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _file(self) -> Path | None:
        name = unquote(urlsplit(self.path).path).lstrip("/")
        if not name or "/" in name or name.startswith("."):
            return None
        path = self.server.root / name
        return path if path.is_file() and not path.is_symlink() else None

    def _head(self, status: int, length: int, stat=None, extra=()) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if stat is not None:
            self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = self._file()
        if path is None:
            self._head(404, 0)
            return
        stat = path.stat()
        start, end = 0, stat.st_size  # end exclusive
        wanted = self.headers.get("Range")
        status, extra = 200, []
        if wanted is not None:
            match = RANGE.fullmatch(wanted.strip())
            first = int(match.group(1)) if match else stat.st_size
            last = int(match.group(2)) if match and match.group(2) else stat.st_size - 1
            if not match or first > last or first >= stat.st_size:
                self._head(416, 0, stat, [("Content-Range", f"bytes */{stat.st_size}")])
                return
            start, end = first, min(last + 1, stat.st_size)
            status, extra = 206, [("Content-Range", f"bytes {start}-{end - 1}/{stat.st_size}")]
        self._head(status, end - start, stat, extra)
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def log_message(self, format, *args):  # one line per request only when asked (--log)
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log", action="store_true", help="print a line per request")
    args = parser.parse_args(argv)
    if not (args.folder / "config.json").is_file():
        print(f"error: {args.folder}: no config.json; expected a checkpoint folder", file=sys.stderr)
        return 2
    server = CheckpointServer((args.host, args.port), args.folder)
    server.log = args.log
    host, port = server.server_address[:2]
    print(f"serving {server.root} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
