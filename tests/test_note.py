"""The technical note (note.pdf) and the certification checks: read back with Debian's poppler-utils
(``pdftotext``, ``pdftoppm``), compared with the ledger's own figures, rendered twice byte for byte,
and tampered with."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.ledger.bundle import RECEIPT, bundle_digest
from kimi_jax.ledger.checksums import write_checksums
from kimi_jax.note.render import CERTIFICATION, NOTE, render_note, write_note_files
from kimi_jax.note.safe_text import escape
from kimi_jax.run.plan import load_plan
from kimi_jax.run.runner import execute
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.certification import check_synthetic_audit, ratification_scope
from kimi_jax.verify.checklist import verify_bundle
from kimi_jax.verify.report import CheckFailed

REPO = Path(__file__).resolve().parents[1]
POPPLER = shutil.which("pdftotext") and shutil.which("pdftoppm")
needs_poppler = pytest.mark.skipif(not POPPLER, reason="poppler-utils not installed (apt-get install poppler-utils)")


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped demo manifest as is: the synthetic tiny preset, no anchor."""
    out = tmp_path_factory.mktemp("note-demo") / "demo"
    execute(load_plan(str(REPO / "manifests" / "demo.yaml"), out_dir=str(out)), echo=_quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A bundle whose checkpoint is "real" in the only sense a bundle can show: read by path, not a
    synth preset, its config none of kimi-jax's presets', no synthetic tokenizer, and every tensor
    checked against a `kimi-jax digest` file, so the ledger records a content root; anchored."""
    tmp = tmp_path_factory.mktemp("note-real")
    ckpt = synth_checkpoint(tmp / "ckpt", "tiny", "deepseek-v3", seed=5, num_hidden_layers=3)
    runner = CliRunner()
    digested = runner.invoke(main, ["digest", str(ckpt)])
    assert digested.exit_code == 0, digested.output
    manifest = tmp / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [7, 300]\ngenerate:\n"
                        "  max_new_tokens: 3\nanchor: anchor.json\noutput:\n  dir: bundle\n")  # fmt: skip
    frozen = runner.invoke(main, ["anchor", "freeze", str(manifest)])
    assert frozen.exit_code == 0, frozen.output
    execute(load_plan(str(manifest)), echo=_quiet, progress=False)
    return tmp / "bundle"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def _edit_json(root: Path, name: str, change) -> None:
    value = json.loads((root / name).read_text())
    change(value)
    (root / name).write_text(json.dumps(value, indent=1) + "\n")


def _reseal(root: Path) -> None:
    write_checksums(root, exclude=(RECEIPT,))
    _edit_json(root, RECEIPT, lambda r: r.update(bundle_digest=bundle_digest(root)))


def _text(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# -- what the note says -------------------------------------------------------------------------


@needs_poppler
def test_the_notes_figures_are_the_ledgers(demo):
    ledger = json.loads((demo / "ledger.json").read_text())
    text = _text(demo / NOTE)
    flat = _flat(text)
    sections = ["1. Claim", "2. Contract", "3. Frozen Anchor and Determinism", "4. Non-Perturbing Capture",
                "5. Output Formation Ledger", "6. Multi-Token Continuity", "7. Observed Structural Surfaces",
                "8. Verification", "9. Boundary", "Badge"]  # fmt: skip
    at = [flat.find(s) for s in sections]
    assert -1 not in at and at == sorted(at), dict(zip(sections, at))  # the seed's parts, in its order
    step0 = ledger["steps"][0]
    for digest in (step0["hidden_digest"], step0["logits_digest"]):
        assert digest in flat  # the anchor table prints step 0's digests in full
    table = [line for line in text.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\d+ '", line)]
    assert len(table) == len(ledger["steps"])
    for line, step in zip(table, ledger["steps"]):  # step, context, token, logit, bytes, wall
        cells = re.split(r"\s{2,}", line.strip())
        assert cells[0] == str(step["index"]) and cells[1] == str(len(step["context"]))
        assert cells[2].split(" ", 1)[0] == str(step["token"])
        assert float(cells[3]) == step["logit"] and cells[3] == json.dumps(step["logit"])
        assert int(cells[4].replace(",", "")) == step["bytes_read"]
        assert abs(float(cells[5]) - step["wall_s"]) <= 0.0005
    total = sum(s["bytes_read"] for s in ledger["steps"])
    assert f"Total: {total:,}" in flat and total == ledger["totals"]["bytes_read"]
    # the badge is the seed's, derived: synthetic, no anchor, proven, no cache
    n, layers = len(ledger["steps"]), len(step0["layers"])
    badge = f"M+D · Lab · Unratified · LC+LP · X1 · NP · {n} tok / {layers} layers / no-cache full pass"
    assert badge in flat
    # run's default proof covers step 0, and the note says so (kimi-jax prove covers every step)
    assert ledger["non_perturbation"]["scope"] == "first"
    assert f"on step 0, the anchor step, of the {n} steps (the proof's scope first" in flat
    assert "capture proven non-perturbing on step 0, the anchor step (section 4)" in flat
    # the synthetic origin is stated in the claim and the boundary, not hidden
    assert "synthetic tiny model" in flat and "seeded random" in flat
    assert "X1 (synthetic)" in flat and "Verdict: SYNTHETIC" in flat


@needs_poppler
def test_every_page_renders(demo, tmp_path):
    from PIL import Image

    info = subprocess.run(["pdfinfo", str(demo / NOTE)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))
    assert "Producer:" in info and "fpdf2" in info
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(demo / NOTE), str(tmp_path / "page")], check=True)
    images = sorted(tmp_path.glob("page*.png"))
    assert len(images) == pages >= 4
    for image in images:
        page = Image.open(image).convert("L")
        body = page.crop((0, 0, page.width, int(page.height * 0.9)))  # above the footer every page has
        assert sum(body.histogram()[:128]) > 100, f"{image.name}: no text or drawing above the footer"


@needs_poppler
def test_a_real_checkpoint_is_X0_and_the_anchor_is_scoped(real):
    report = verify_bundle(real)
    assert report.ok and report.status("note") == "OK", report.format()
    assert report.reason("synthetic-audit").startswith("X0: checkpoint ")
    scope = report.reason("ratification-scope")
    assert scope.startswith("step 0 only (token, logit, hidden_digest, logits_digest, bytes_read)")
    assert "checkpoint named by content root" in scope and "steps 1-2 and derived fields are not ratified" in scope
    flat = _flat(_text(real / NOTE))
    ledger = json.loads((real / "ledger.json").read_text())
    anchor = json.loads((real / "anchor.json").read_text())
    assert "X0 (clean)" in flat and "Verdict: SAFE" in flat
    assert "· Ratified · LC+LP · X0 · NP · 3 tok / 3 layers / KV-cache decode" in flat
    assert "Table 2. Frozen single-step anchor (anchor.json)." in flat
    for value in (anchor["hidden_digest"], anchor["logits_digest"], f"{anchor['bytes_read']:,}",
                  json.dumps(anchor["logit"]), ledger["checkpoint"]["content_root"]):  # fmt: skip
        assert value in flat
    assert "Table 1." in flat and "3 (0 dense + 3 MoE)" not in flat  # the dense layer 0 is counted apart


def test_a_synthetic_checkpoint_is_X1_with_every_reason(demo, small_bundle):
    preset = verify_bundle(demo).reason("synthetic-audit")
    assert preset.startswith("X1: manifest.json model.synthetic names the tiny preset")
    assert "checkpoint.content_root is null" in preset and "synthetic 2,048-token tokenizer" in preset
    # the same synthetic weights read by path: recognised by their config and their tokenizer
    by_path = verify_bundle(small_bundle)
    assert by_path.ok, by_path.format()
    reason = by_path.reason("synthetic-audit")
    assert reason.startswith("X1: ledger.json checkpoint.config_digest is the config of kimi-jax's synthetic "
                             "preset tiny in layout kimi-k2.5")  # fmt: skip
    assert "tokenizer/ is kimi-jax's synthetic" in reason


def test_origin_records_that_contradict_each_other_fail_the_audit(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "manifest.json", lambda m: m["model"]["synthetic"].update(preset="small"))
    with pytest.raises(CheckFailed, match="model.synthetic is preset small in layout kimi-k2.5, but ledger.json "
                                          "checkpoint.config_digest"):  # fmt: skip
        check_synthetic_audit(BundleView(root))


def test_an_anchor_that_claims_another_prompt_is_out_of_scope(real, tmp_path):
    root = _copy(real, tmp_path)
    _edit_json(root, "anchor.json", lambda a: a.update(prompt=[7]))
    with pytest.raises(CheckFailed, match=r"anchor.json prompt \[7\] is not step 0's context"):
        ratification_scope(BundleView(root))


def test_a_platform_that_is_not_the_environment_records_fails_the_runtime_contract(real, tmp_path):
    root = _copy(real, tmp_path)
    _edit_json(root, "environment.json", lambda e: e["platform"].update(cpu_model="another CPU"))
    write_note_files(root)  # a forger renders the note again: only the contract check is left to fail
    _reseal(root)
    report = verify_bundle(root)
    assert report.failed == ["runtime-contract"], report.format()
    assert "environment.json platform differs from ledger.json platform" in report.reason("runtime-contract")


def test_a_planted_resource_fails_explorer_scope(demo, tmp_path):
    root = _copy(demo, tmp_path)
    page = (root / "explorer.html").read_text(encoding="utf-8")
    (root / "explorer.html").write_text(page.replace("</main>", '<img src="https://example.com/p.png"></main>'),
                                        encoding="utf-8")  # fmt: skip
    _reseal(root)
    report = verify_bundle(root)
    assert "explorer-scope" in report.failed
    assert "names an outside resource <img src='https://example.com/p.png'>" in report.reason("explorer-scope")


# -- determinism and tampering ------------------------------------------------------------------


def test_the_same_bundle_renders_the_same_bytes_in_any_process(demo, tmp_path):
    stored = (demo / NOTE).read_bytes()
    assert render_note(demo) == stored
    for seed in ("1", "2"):  # another interpreter, another hash seed: the same bytes
        out = tmp_path / f"note-{seed}.pdf"
        proc = subprocess.run([sys.executable, "-m", "kimi_jax.cli", "note", str(demo), "-o", str(out)],
                              env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "byte-identical to the bundle's note.pdf" in proc.stderr
        assert out.read_bytes() == stored
    assert b"/CreationDate (D:20000101000000Z" in stored


def test_a_tampered_note_fails_verify(demo, tmp_path):
    root = _copy(demo, tmp_path)
    data = bytearray((root / NOTE).read_bytes())
    at = data.index(b"/Producer (") + len(b"/Producer (")
    data[at : at + 8] = b"forged: "
    (root / NOTE).write_bytes(bytes(data))
    _reseal(root)
    report = verify_bundle(root)
    assert report.failed == ["note"], report.format()
    assert "note.pdf: not the note.pdf rendered from the bundle's files (first difference at byte" in report.reason("note")
    assert "it was rendered by 'forged: " in report.reason("note")


def test_a_tampered_ledger_fails_the_note(demo, tmp_path):
    from kimi_jax.explorer.page import write_explorer

    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][2].update(wall_s=123.5))  # measured, derives nothing
    write_explorer(root)
    _reseal(root)
    report = verify_bundle(root)
    assert report.failed == ["note"], report.format()
    assert report.reason("note").startswith("note.pdf: not the note.pdf rendered from the bundle's files")


def test_a_bundle_from_before_the_note_still_verifies_and_replays(real, tmp_path):
    root = _copy(real, tmp_path)
    (root / NOTE).unlink()
    (root / CERTIFICATION).unlink()
    _reseal(root)
    report = verify_bundle(root, replay=True)
    assert report.ok, report.format()
    assert report.status("note") == "SKIPPED" and "written before kimi-jax wrote notes" in report.reason("note")
    assert report.status("replay") == "OK"
    # one file of the pair without the other is not a bundle kimi-jax writes
    (root / NOTE).write_bytes((real / NOTE).read_bytes())
    _reseal(root)
    assert "certification.json: missing, but note.pdf is present" in verify_bundle(root).reason("note")


# -- printing text safely, the command ----------------------------------------------------------


def test_control_characters_and_missing_glyphs_are_escaped():
    covered = frozenset(range(0x20, 0x7F)) | {0x2192}
    assert escape("a\u202eb\x00c\n\u00e9\U0001f600 \u2192", covered) == \
        "a\\u{202e}b\\u{0}c\\u{a}\\u{e9}\\u{1f600} \u2192"  # fmt: skip


@needs_poppler
def test_token_text_reaches_the_page_escaped(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][0].update(token_text="x\u202e\U0001f600\x07y"))
    out = tmp_path / "n.pdf"
    out.write_bytes(render_note(root))
    flat = _flat(_text(out))
    assert "x\\u{202e}\\u{1f600}\\u{7}y" in flat
    assert "\u202e" not in flat and "\U0001f600" not in flat


def test_note_command_writes_outside_the_bundle_only(demo, tmp_path, monkeypatch):
    from kimi_jax.ledger.archive import archive_bundle

    runner = CliRunner()
    inside = runner.invoke(main, ["note", str(demo), "-o", str(demo / "again.pdf")])
    assert inside.exit_code == 2 and "inside the bundle" in inside.output
    assert not (demo / "again.pdf").exists()
    archive = archive_bundle(demo, tmp_path / "demo.tar.gz")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["note", str(archive)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo.note.pdf").read_bytes() == (demo / NOTE).read_bytes()
