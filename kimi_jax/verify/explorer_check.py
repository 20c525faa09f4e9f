"""Check 10 of verify: the bundle's explorer page is the page rendered from its ledger, and when it
is not, what differs (its embedded ledger, or data blocks planted beside it)."""

from __future__ import annotations

from html.parser import HTMLParser

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import parse_json, read_regular
from kimi_jax.ledger.bundle import MAX_JSON_BYTES
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, CheckSkipped, first_difference, join_problems, require

__all__ = ["EXPLORER_ELEMENT_ID", "check_explorer"]

EXPLORER_ELEMENT_ID = "ledger-data"


class _DataBlocks(HTMLParser):
    """Every <script> whose type is JSON: (attributes, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.blocks: list[tuple[dict[str, str | None], str]] = []
        self._open: tuple[dict[str, str | None], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "script":
            attributes = {k.lower(): v for k, v in attrs}
            kind = (attributes.get("type") or "").split(";")[0].strip().lower()
            if kind == "application/json" or kind.endswith("+json") or kind == "text/json":
                self._open = (attributes, [])

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._open is not None:
            self.blocks.append((self._open[0], "".join(self._open[1])))
            self._open = None


def check_explorer(b: BundleView) -> str:
    """The page is a pure function of the ledger, so it must be byte for byte the page this
    kimi-jax renders from ledger.json: nothing planted in it (a script, a link) survives."""
    from kimi_jax.explorer.page import render_explorer

    if not b.has("explorer.html"):
        raise CheckSkipped("the bundle has no explorer.html")
    try:
        page = read_regular(b.root / "explorer.html", 2 * MAX_JSON_BYTES, "explorer.html")
        want = render_explorer(b.ledger).encode("utf-8")
    except KimiJaxError as e:
        raise CheckFailed(b.relative(str(e))) from None
    if page == want:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(page, want)) if x != y), min(len(page), len(want)))
    why = [f"explorer.html: not the page rendered from ledger.json (first difference at byte {at:,} of "
           f"{len(page):,}; the rendered page has {len(want):,} bytes)"]  # fmt: skip
    try:
        text = page.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckFailed(join_problems([*why, f"explorer.html: not UTF-8 ({e})"])) from None
    problems = _explain_page(b, text)
    require(why + problems)
    return ""


def _explain_page(b: BundleView, text: str) -> list[str]:
    """What differs in a page that is not the rendered one: its embedded ledger, or extra data blocks."""
    parser = _DataBlocks()
    parser.feed(text)
    parser.close()
    problems = []
    ours = [(a, t) for a, t in parser.blocks if a.get("id") == EXPLORER_ELEMENT_ID]
    others = [a.get("id") or "(no id)" for a, _ in parser.blocks if a.get("id") != EXPLORER_ELEMENT_ID]
    if len(ours) != 1:
        problems.append(f"explorer.html: expected exactly one <script type=\"application/json\" "
                        f"id=\"{EXPLORER_ELEMENT_ID}\">, found {len(ours)}")  # fmt: skip
    if others:
        problems.append(f"explorer.html: holds other JSON data blocks (ids {', '.join(others)}); expected only "
                        f"#{EXPLORER_ELEMENT_ID}")  # fmt: skip
    if len(ours) == 1:
        try:
            embedded = parse_json(ours[0][1].encode("utf-8", "surrogatepass"), "explorer.html")
        except KimiJaxError as e:
            problems.append(f"explorer.html: #{EXPLORER_ELEMENT_ID} is not valid JSON ({e})")
        else:
            if embedded != b.json("ledger.json"):
                where = first_difference(b.json("ledger.json"), embedded, "")
                problems.append(f"explorer.html: the ledger embedded in #{EXPLORER_ELEMENT_ID} differs from "
                                f"ledger.json (first at {where or '<root>'})")  # fmt: skip
    return problems
