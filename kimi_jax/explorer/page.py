"""``explorer.html``: the offline ledger explorer, one self-contained page over ``ledger.json``.

The page works from ``file://`` with no network: Chart.js 4, chartjs-chart-matrix and the BLAKE3 of
@noble/hashes (vendored in ``kimi_jax/assets`` with their licenses) and the page's own scripts and style
(``kimi_jax/assets/explorer/``) are inlined at render time, and a Content-Security-Policy meta
tag forbids every fetch (``default-src 'none'``).

The ledger is embedded exactly once, as ``<script type="application/json" id="ledger-data">``,
and is the only data the page reads; ``<``, ``>``, ``&`` and U+2028/U+2029 are written as
``\\uXXXX`` escapes inside it, so no string in the ledger can end the script element. The
page inserts ledger text only through ``textContent`` / ``createTextNode``. Provenance
(measured: green, derived: blue) is looked up per field path in :func:`kimi_jax.ledger.ledger.provenance_map`,
i.e. the schema's ``x-provenance``, which is inlined into the page's script.

``kimi-jax explore BUNDLE`` (:data:`explore_command`) opens a bundle's page, rendering it from
``ledger.json`` first when the bundle has none; ``--serve`` serves the bundle's regular files on
127.0.0.1 only (see :class:`_Handler` for what it refuses).
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import mimetypes
import os
import re
import shutil
import urllib.parse
import webbrowser
from importlib import resources
from pathlib import Path
from typing import Any

import click

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import open_regular, read_json, read_regular
from kimi_jax.ledger.checksums import MAX_LISTING_BYTES

TITLE = "Kimi K2.5 Output Formation Ledger"
PAGE = "explorer.html"
LIBRARIES = ("chart.umd.min.js", "chartjs-chart-matrix.min.js")
# The "verify this bundle" view: @noble/hashes' BLAKE3 (vendored with its license) and its script.
VERIFIER = ("noble-hashes-blake3.js",)
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")  # fmt: skip

_PLACEHOLDER = re.compile(r"@@([A-Z]+)@@")
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)
# what must not appear verbatim inside an inline <script> element
_SCRIPT_BREAKERS = ("</script", "<!--", "<script")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_ESCAPE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def _resource(*parts: str) -> str:
    return resources.files("kimi_jax").joinpath("assets", *parts).read_text(encoding="utf-8")


def _script_text(text: str, name: str) -> str:
    """Text safe to place inside an inline ``<script>`` element (source-map comments dropped)."""
    text = _SOURCE_MAP.sub("", text)
    lowered = text.lower()
    for bad in _SCRIPT_BREAKERS:
        if bad in lowered:
            raise ValueError(f"{name}: contains {bad!r} and cannot be inlined in a <script> element")
    return text


def json_for_script(data: Any) -> str:
    """JSON text that parses back to ``data`` and cannot end (or otherwise alter) a script element.

    ``<``, ``>``, ``&``, U+2028, U+2029 and lone surrogates (which UTF-8 cannot carry) are
    written as ``\\uXXXX``; only string contents can hold them, so the value is unchanged."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JSON_ESCAPE.sub(lambda m: _JSON_ESCAPES.get(m.group()) or f"\\u{ord(m.group()):04x}", text)


def inline_library(name: str) -> str:
    """A vendored chart library (``kimi_jax/assets/NAME``) as text safe inside an inline script."""
    return _script_text(_resource(name), f"kimi_jax/assets/{name}")


@functools.lru_cache(maxsize=1)
def _static_parts() -> dict[str, str]:
    libraries = "\n;\n".join(inline_library(name) for name in LIBRARIES)
    css = _resource("explorer", "explorer.css")
    if "</style" in css.lower():
        raise ValueError("kimi_jax/assets/explorer/explorer.css: contains '</style'")
    return {
        "TEMPLATE": _resource("explorer", "explorer.html"),
        "CSS": css,
        "LIBRARIES": libraries,
        "APP": _script_text(_resource("explorer", "explorer.js"), "kimi_jax/assets/explorer/explorer.js"),
        "VERIFIER": "\n;\n".join([*(inline_library(name) for name in VERIFIER),
                                    _script_text(_resource("explorer", "verify.js"), "kimi_jax/assets/explorer/verify.js")]),
    }


class ExplorerError(KimiJaxError):
    """A ledger the explorer cannot show (no steps, a value JSON cannot carry)."""


def render_explorer(ledger: dict, title: str = TITLE) -> str:
    """The explorer page for ``ledger``: one self-contained HTML document (UTF-8 text)."""
    # imported here, not at the top: `kimi-jax --help` registers this module's command and
    # should not pay for numpy, which the ledger module pulls in
    from kimi_jax.ledger.ledger import provenance_map

    shown = ledger.get("sequences") if isinstance(ledger, dict) and "sequences" in ledger else [ledger]
    if not isinstance(shown, list) or not shown or not all(
            isinstance(s, dict) and isinstance(s.get("steps"), list) and s["steps"] for s in shown):
        raise ExplorerError("ledger.json: steps: the ledger has no steps to show; expected at least one step "
                            "(of every sequence)")  # fmt: skip
    try:
        embedded = json_for_script(ledger)
    except ValueError as e:  # NaN or Infinity: JSON, and so the page, cannot carry them
        raise ExplorerError(f"ledger.json: holds a value JSON cannot carry ({e})") from None
    parts = _static_parts()
    values = {
        "CSP": html.escape(CSP, quote=True),
        "TITLE": html.escape(title, quote=True),
        "CSS": parts["CSS"],
        "LIBRARIES": parts["LIBRARIES"],
        "APP": parts["APP"],
        "VERIFIER": parts["VERIFIER"],
        "LEDGER": embedded,
        "PROVENANCE": json_for_script(dict(sorted(provenance_map().items()))),
    }
    # one pass: text substituted in is never scanned for placeholders again
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], parts["TEMPLATE"])


def write_explorer(bundle: Path, title: str = TITLE) -> Path:
    """Render ``BUNDLE/explorer.html`` from ``BUNDLE/ledger.json``; returns the page's path."""
    from kimi_jax.fileio import write_bytes_atomic
    from kimi_jax.ledger.bundle import MAX_JSON_BYTES  # numpy, like provenance_map above

    bundle = Path(bundle)
    ledger = read_json(bundle / "ledger.json", MAX_JSON_BYTES, "ledger.json")
    return write_bytes_atomic(bundle / PAGE, render_explorer(ledger, title).encode("utf-8"))


def _ensure_page(bundle: Path) -> Path:
    page = bundle / PAGE
    if page.is_file():
        return page
    if not (bundle / "ledger.json").is_file():
        raise click.UsageError(f"{bundle}: neither {PAGE} nor ledger.json found; is this a kimi-jax bundle?")
    try:
        write_explorer(bundle)
    except OSError as e:
        from kimi_jax.errors import OutputError
        from kimi_jax.fileio import write_failure

        if write_failure(e) is None:
            raise
        raise OutputError(f"{bundle}: the bundle has no {PAGE}, and rendering one into it failed: {write_failure(e)}; "
                          "copy the bundle somewhere writable and explore the copy") from None  # fmt: skip
    click.echo(f"rendered {page} from ledger.json", err=True)
    checksums = bundle / "CHECKSUMS.b3"
    if checksums.is_file() and f"  {PAGE}\n".encode() not in read_regular(checksums, MAX_LISTING_BYTES, checksums.name):
        click.echo(f"note: {PAGE} is not listed in {checksums.name}; checksum verification of the bundle will "
                   "report it as an extra file", err=True)  # fmt: skip
    return page


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the bundle's regular files, resolved inside it, and nothing else: no listings, no
    file outside the bundle (a symbolic link leading out is not followed), no file outside the
    bundle layout (:func:`kimi_jax.ledger.bundle.in_bundle_layout`), and only to requests
    whose ``Host`` is the address the server is bound to, so a page on another site cannot reach
    it by rebinding its own name to 127.0.0.1."""

    def __init__(self, *args, root: Path, **kwargs) -> None:
        self.root = root
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        port = self.server.server_address[1]
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"} | ({"127.0.0.1", "localhost"} if port == 80 else set())
        if (self.headers.get("Host") or "").strip().lower() not in hosts:
            self._refuse(403, "this server answers only requests addressed to 127.0.0.1")
            return
        path = self._resolve()
        if path is None:
            self._refuse(404, "not found")
            return
        try:
            fd = open_regular(path)
        except KimiJaxError:
            self._refuse(404, "not found")
            return
        with open(fd, "rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            if body:
                shutil.copyfileobj(f, self.wfile)

    def _resolve(self) -> Path | None:
        """The regular file inside the bundle that the request names, or None. Only the files of
        a bundle's layout are served: anything else kept in the bundle's folder is not the bundle's."""
        from kimi_jax.ledger.bundle import in_bundle_layout

        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in rel.split("/") if p] or [PAGE]
        if "\x00" in rel or "\\" in rel or any(p in (".", "..") for p in parts) or not in_bundle_layout("/".join(parts)):
            return None
        target = Path(os.path.realpath(self.root.joinpath(*parts)))
        return target if self.root in target.parents and target.is_file() else None

    def _refuse(self, code: int, why: str) -> None:
        data = f"{code} {why}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()


def make_server(bundle: Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the bundle directory bound to 127.0.0.1 only (``port`` 0: any free port)."""
    handler = functools.partial(_Handler, root=Path(os.path.realpath(bundle)))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def _run_server(server: http.server.ThreadingHTTPServer) -> None:
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def _open(url: str) -> None:
    try:
        opened = webbrowser.open(url)
    except Exception:  # no browser, no display: printing the URL is enough
        opened = False
    if not opened:
        click.echo("(no browser could be opened; open the URL above yourself)", err=True)


@click.command("explore")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--serve/--no-serve", default=False, show_default=True,
              help="Serve the bundle over HTTP on 127.0.0.1 until interrupted, instead of opening the file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port for --serve (0: any free port).")
@click.option("--browser/--no-browser", default=True, show_default=True, help="Try to open the page in a web browser.")
def explore_command(bundle: Path, serve: bool, port: int, browser: bool) -> None:
    """Open a run bundle's offline explorer page (rendered from ledger.json when the bundle has none)."""
    bundle = bundle.resolve()
    page = _ensure_page(bundle)
    if not serve:
        url = page.as_uri()
        click.echo(url)
        if browser:
            _open(url)
        return
    try:
        server = make_server(bundle, port)
    except OSError as e:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
    url = f"http://127.0.0.1:{server.server_address[1]}/{PAGE}"
    click.echo(url)
    click.echo("serving the bundle on 127.0.0.1 only; press Ctrl-C to stop", err=True)
    if browser:
        _open(url)
    try:
        _run_server(server)
    finally:
        server.server_close()
