"""The explorer's "verify this bundle" view in headless Chromium (Playwright), from file://: a good
bundle passes, and a flipped byte, a missing file and a planted file each fail, given as a folder
and as the .tar.gz of `kimi-jax archive`. Skipped without Chromium or Playwright, as the other
browser tests are (tests/test_explorer_browser.py)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import blake3
import pytest

from kimi_jax.ledger.archive import archive_bundle
from tests.test_explorer_browser import WATCH, browser  # noqa: F401 - the shared Chromium fixture

CASES = ("intact", "flipped", "missing", "planted")


def _tamper(bundle: Path, where: Path, case: str) -> Path:
    root = Path(shutil.copytree(bundle, where / case / bundle.name))
    if case == "flipped":
        data = bytearray((root / "ledger.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (root / "ledger.json").write_bytes(bytes(data))
    elif case == "missing":
        (root / "non_perturbation.json").unlink()
    elif case == "planted":
        (root / "arrays" / "planted.bin").write_bytes(b"not listed")
    return root


def _archive(root: Path, path: Path) -> Path:
    """The bundle as `kimi-jax archive` packs it; a planted file, which that command refuses to pack,
    as a forger packs it (the same layout, with tarfile)."""
    if not (root / "arrays" / "planted.bin").exists():
        return archive_bundle(root, path)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return path


@pytest.fixture(scope="module")
def page(browser, small_bundle):  # noqa: F811
    """The bundle's own explorer page, opened from file:// with every request but the page refused."""
    context = browser.new_context(viewport={"width": 1300, "height": 900}, service_workers="block")
    url = (small_bundle / "explorer.html").resolve().as_uri()
    requests: list[str] = []
    context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    opened = context.new_page()
    errors: list[str] = []
    opened.on("request", lambda r: requests.append(r.url))
    opened.on("pageerror", lambda e: errors.append(str(e)))
    opened.add_init_script(WATCH)
    opened.goto(url)
    opened.wait_for_selector("body[data-ready='1']")
    yield opened, requests, errors, url
    context.close()


def _verify(opened, selector: str, path: Path) -> tuple[str, str, dict[str, str]]:
    opened.set_input_files(selector, str(path))
    opened.wait_for_selector("#verify-status[data-result=ok], #verify-status[data-result=fail]", timeout=60_000)
    status = opened.locator("#verify-status")
    rows = opened.locator("#verify-table tbody tr")
    files = {rows.nth(i).locator("td").nth(0).text_content(): rows.nth(i).get_attribute("data-status")
             for i in range(rows.count())}  # fmt: skip
    return status.get_attribute("data-result"), status.text_content(), files


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_the_page_verifies_a_bundle_and_rejects_each_tampering(page, small_bundle, tmp_path, form):
    opened, requests, errors, url = page
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in
              (small_bundle / "CHECKSUMS.b3").read_text().splitlines()}  # fmt: skip
    for case in CASES:
        root = _tamper(small_bundle, tmp_path / form, case)
        given = root if form == "folder" else _archive(root, tmp_path / form / f"{case}.tar.gz")
        # reset the view so a stale result cannot pass for this one
        opened.evaluate("document.getElementById('verify-status').dataset.result = 'idle'")
        result, text, files = _verify(opened, "#verify-folder" if form == "folder" else "#verify-archive", given)
        if case == "intact":
            assert result == "ok" and text.startswith("VERIFIED"), text
            assert {f: s for f, s in files.items() if f != "receipt.json"} == {f: "OK" for f in listed}
            # the digests shown are BLAKE3 computed in the page: compare one with Python's
            shown = opened.locator("#verify-table tbody tr[data-status=OK] td:nth-child(3)").nth(1).text_content()
            assert shown in {blake3.blake3((root / f).read_bytes()).hexdigest() for f in listed}
            assert not opened.locator("#verify-certification").is_hidden()
            cert = json.loads((small_bundle / "certification.json").read_text())
            assert opened.locator("#certification-table tbody tr").count() == len(cert["rows"])
            assert opened.locator("#verify-same").text_content() == "Its ledger.json is the ledger this page shows."
        else:
            assert result == "fail" and text.startswith("NOT VERIFIED"), (case, text)
            want = {"flipped": ("ledger.json", "CHANGED"), "missing": ("non_perturbation.json", "MISSING"),
                    "planted": ("arrays/planted.bin", "UNLISTED")}[case]  # fmt: skip
            assert files.get(want[0]) == want[1], (case, files)
            assert [f for f, s in files.items() if s != "OK"] == [want[0]], (case, files)
            assert opened.locator("#verify-certification").is_hidden()
    assert requests == [url], f"network requests besides the page itself: {requests}"
    assert errors == [] and opened.evaluate("window.__cspViolations") == []


def test_a_forged_receipt_fails_in_the_page(page, small_bundle, tmp_path):
    opened, *_ = page
    root = Path(shutil.copytree(small_bundle, tmp_path / small_bundle.name))
    receipt = json.loads((root / "receipt.json").read_text())
    receipt["bundle_digest"] = "0" * 64
    (root / "receipt.json").write_text(json.dumps(receipt))
    opened.evaluate("document.getElementById('verify-status').dataset.result = 'idle'")
    result, text, files = _verify(opened, "#verify-folder", root)
    assert result == "fail" and "bundle_digest" in text and files["receipt.json"] == "FAILED"
