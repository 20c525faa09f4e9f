"""``kimi-jax explore --serve`` serves the bundle's regular files and nothing else, only to requests
addressed to 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import shutil
import threading
from pathlib import Path

import pytest

from kimi_jax.explorer.page import make_server


@pytest.fixture
def served(small_bundle, tmp_path):
    bundle = Path(shutil.copytree(small_bundle, tmp_path / "bundle"))
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the bundle")
    (bundle / "leak.txt").symlink_to(secret)
    (bundle / "anchor.json").symlink_to(bundle / "ledger.json")  # a link that stays inside, at a name of the layout
    (bundle / "notes.txt").write_text("kept in the bundle's folder, not part of the bundle")
    os.mkfifo(bundle / "pipe")
    server = make_server(bundle, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield bundle, server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def _get(port: int, path: str, host: str | None = "default", method: str = "GET") -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {} if host == "default" else {"Host": host} if host is not None else {}
    if host is None:
        conn.putrequest(method, path, skip_host=True)
        conn.endheaders()
    else:
        conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, dict(response.getheaders())


def test_serves_the_bundle_files(served):
    bundle, port = served
    status, body, headers = _get(port, "/explorer.html")
    assert status == 200 and body == (bundle / "explorer.html").read_bytes()
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["Content-Type"] == "text/html"
    assert _get(port, "/")[:2] == (200, body)
    assert _get(port, "/ledger.json")[1] == (bundle / "ledger.json").read_bytes()
    assert _get(port, "/anchor.json")[0] == 200  # a link that stays inside the bundle
    assert _get(port, "/explorer.html", host=f"localhost:{port}")[0] == 200
    status, body, headers = _get(port, "/explorer.html", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == (bundle / "explorer.html").stat().st_size


@pytest.mark.parametrize("path", ["/leak.txt", "/arrays", "/arrays/", "/../secret.txt", "/%2e%2e/secret.txt",
                                  "/arrays/%2e%2e/%2e%2e/secret.txt", "/pipe", "/nothing.html", "/explorer.html%00"])
def test_refuses_links_out_listings_and_special_files(served, path):
    _, port = served
    status, body, _ = _get(port, path)
    assert status == 404 and b"outside the bundle" not in body and b"<a href" not in body


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1:1", None])
def test_refuses_requests_addressed_to_another_host(served, host):
    _, port = served
    status, body, _ = _get(port, "/explorer.html", host=host)
    assert status == 403 and b"127.0.0.1" in body


def test_files_outside_the_bundle_layout_are_not_served(served):
    """Main served any regular file under the bundle folder, part of the bundle or not."""
    bundle, port = served
    assert (bundle / "notes.txt").is_file()
    assert _get(port, "/notes.txt")[0] == 404
    assert _get(port, "/tokenizer/../notes.txt")[0] == 404
    assert _get(port, "/receipt.json")[0] == 200 and _get(port, "/CHECKSUMS.b3")[0] == 200
