"""``kimi-jax verify``: every check passes on real bundles and the right one fires on each tampering."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import blake3
import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.explorer.page import write_explorer
from kimi_jax.ledger.archive import archive_bundle
from kimi_jax.ledger.bundle import RECEIPT, bundle_digest
from kimi_jax.ledger.checksums import write_checksums
from kimi_jax.manifest import manifest_digest
from kimi_jax.note.render import write_note_files
from kimi_jax.run.plan import load_plan
from kimi_jax.run.runner import execute
from kimi_jax.verify import checklist
from kimi_jax.verify.checklist import CHECK_NAMES, Report, verify_bundle
from kimi_jax.verify.replay import dequant_difference, replay_differences

DEMO_MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "demo.yaml"


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped demo manifest, run as is (no anchor)."""
    out = tmp_path_factory.mktemp("verify-demo") / "demo"
    execute(load_plan(str(DEMO_MANIFEST), out_dir=str(out)), echo=_quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def anchored(tiny_checkpoints, tmp_path_factory):
    """A 3-step run of a manifest whose anchor was frozen through the CLI, proven on every step."""
    tmp = tmp_path_factory.mktemp("verify-anchored")
    manifest = tmp / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {tiny_checkpoints['kimi-k2.5']}\nprompt:\n"
                        f"  tokens: [7, 300, 7]\ngenerate:\n  max_new_tokens: 3\nanchor: anchor.json\n"
                        f"output:\n  dir: bundle\n")  # fmt: skip
    frozen = CliRunner().invoke(main, ["anchor", "freeze", str(manifest)])
    assert frozen.exit_code == 0, frozen.output
    execute(load_plan(str(manifest)), prove="all", echo=_quiet, progress=False)
    return tmp / "bundle"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def _edit_json(root: Path, name: str, change) -> None:
    path = root / name
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value, indent=1) + "\n")


def _resign(root: Path) -> None:
    """What a forger would do: render the explorer page and the note again, refresh CHECKSUMS.b3 and the
    receipt's digest."""
    if (root / "explorer.html").exists():
        write_explorer(root)
    if (root / "note.pdf").exists():
        write_note_files(root)
    _reseal(root)


def _reseal(root: Path) -> None:
    write_checksums(root, exclude=(RECEIPT,))
    _edit_json(root, RECEIPT, lambda r: r.update(bundle_digest=bundle_digest(root)))


def _write_page(root: Path, extra: str = "", ledger_text: str | None = None) -> None:
    text = ledger_text if ledger_text is not None else (root / "ledger.json").read_text()
    (root / "explorer.html").write_text(f'<!doctype html><html><head><title>x</title></head><body>\n'
                                        f'<script type="application/json" id="ledger-data">{text}</script>\n{extra}'
                                        f'<script>const x = 1;</script></body></html>\n')  # fmt: skip


def _statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


# -- bundles as written -------------------------------------------------------------------------


def test_demo_bundle_verifies(demo):
    report = verify_bundle(demo)
    assert [c.number for c in report.checks] == list(range(1, len(CHECK_NAMES) + 1))
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    documented = re.findall(r"^ ?\d+\. ``([a-z-]+)``", checklist.__doc__, re.M)  # the numbered list verify documents
    assert documented == [*CHECK_NAMES, "replay"]
    statuses = _statuses(report)
    assert statuses.pop("anchor") == statuses.pop("ratification-scope") == "SKIPPED"
    assert statuses.pop("explorer") in ("SKIPPED", "OK")  # the explorer page is optional
    assert set(statuses.values()) == {"OK"}, report.format()
    assert report.ok


def test_anchored_bundle_verifies_every_check(anchored):
    report = verify_bundle(anchored)
    statuses = _statuses(report)
    assert statuses.pop("explorer") in ("SKIPPED", "OK")
    assert set(statuses.values()) == {"OK"}, report.format()
    assert (anchored / "anchor.json").exists()


def test_verify_through_receipt_path(anchored):
    report = verify_bundle(anchored / RECEIPT)
    assert report.ok, report.format()
    assert report.status("anchor") == "OK"


def test_cli_prints_numbered_checks_and_exits_by_outcome(demo, tmp_path):
    good = CliRunner().invoke(main, ["verify", str(demo)])
    assert good.exit_code == 0, good.output
    lines = good.output.splitlines()
    assert lines[0] == "1. checksums: OK"
    assert any(line.startswith("7. anchor: SKIPPED: ") for line in lines)
    assert "VERIFIED" in lines[-1] and "NOT VERIFIED" not in lines[-1]

    bad = _copy(demo, tmp_path)
    (bad / "stray.txt").write_text("x")
    out = CliRunner().invoke(main, ["verify", str(bad)])
    assert out.exit_code == 1
    assert "1. checksums: FAILED: stray.txt: present but not listed in CHECKSUMS.b3" in out.output
    assert f"NOT VERIFIED: 1 of {len(CHECK_NAMES)} checks FAILED (checksums)" in out.output.splitlines()[-1]


def test_no_checks_is_not_success():
    assert not Report("x", "x", []).ok


# -- tampering: checksums -----------------------------------------------------------------------


def _arrays_file(root: Path) -> str:
    files = sorted((p for p in (root / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return files[-1].relative_to(root).as_posix()


@pytest.mark.parametrize("name", ["ledger.json", "manifest.json", "ARRAYS", "environment.json", "provenance.json",
                                  "non_perturbation.json", "anchor.json", "manifest.yaml"])  # fmt: skip
def test_one_flipped_byte_fails_checksums_naming_the_file(anchored, tmp_path, name):
    root = _copy(anchored, tmp_path)
    rel = _arrays_file(root) if name == "ARRAYS" else name
    path = root / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_bundle(root)
    assert report.status("checksums") == "FAILED"
    assert f"{rel}: BLAKE3 mismatch" in report.reason("checksums")
    assert not report.ok


def test_deleted_and_added_files_fail_checksums(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    (root / "environment.json").unlink()
    (root / "arrays" / "extra.bin").write_bytes(b"\0")
    report = verify_bundle(root)
    reason = report.reason("checksums")
    assert report.status("checksums") == "FAILED"
    assert "environment.json: listed in CHECKSUMS.b3 but missing" in reason
    assert "arrays/extra.bin: present but not listed in CHECKSUMS.b3" in reason


def test_symlink_in_bundle_fails_checksums(demo, tmp_path):
    root = _copy(demo, tmp_path)
    (root / "link.json").symlink_to(root / "ledger.json")
    report = verify_bundle(root)
    assert "link.json: symbolic link" in report.reason("checksums")


def test_tampered_checksums_list_fails_the_receipt(demo, tmp_path):
    root = _copy(demo, tmp_path)
    write_checksums(root, exclude=(RECEIPT,))  # same content, but the receipt is not updated ...
    with open(root / "CHECKSUMS.b3", "a") as f:  # ... and the list is changed
        f.write("0" * 64 + "  ghost.json\n")
    report = verify_bundle(root)
    assert report.status("receipt") == "FAILED"
    assert "bundle_digest" in report.reason("receipt")
    assert "ghost.json: listed in CHECKSUMS.b3 but missing" in report.reason("checksums")


# -- tampering, then re-signed: the specific check fires ----------------------------------------


def test_edited_entropy_fails_only_derivations(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][1].update(entropy=l["steps"][1]["entropy"] + 0.125))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["derivations"], report.format()
    assert "steps[1].entropy" in report.reason("derivations")


def test_edited_routing_weight_fails_only_derivations(anchored, tmp_path):
    root = _copy(anchored, tmp_path)

    def change(ledger):
        layer = next(l for l in ledger["steps"][2]["layers"] if l["kind"] == "moe")
        layer["routing_weights"][0][0] = 0.5

    _edit_json(root, "ledger.json", change)
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["derivations"], report.format()
    assert "steps[2].layers[" in report.reason("derivations") and "routing_weights" in report.reason("derivations")


def test_broken_context_fails_only_continuity(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][2]["context"].__setitem__(-1, 5))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["continuity"], report.format()
    assert "steps[2].context" in report.reason("continuity")


def test_byte_totals_fail_continuity(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["totals"].update(bytes_read=l["totals"]["bytes_read"] + 1))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["continuity"], report.format()
    assert "totals.bytes_read" in report.reason("continuity")


def test_step_bytes_must_be_layers_plus_embedding_and_head(demo, tmp_path):
    root = _copy(demo, tmp_path)

    def change(ledger):  # move 256 bytes from the embedding/head share into a layer: totals still add up
        step = ledger["steps"][2]
        step["layers"][0]["bytes_read"] += 256

    _edit_json(root, "ledger.json", change)
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["continuity"], report.format()
    assert "steps[2].bytes_read is" in report.reason("continuity") and "for embedding rows and the head" in \
        report.reason("continuity")


def test_edited_digest_fails_digests(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][1].update(logits_digest="0" * 64))
    _resign(root)
    report = verify_bundle(root)
    assert report.status("digests") == "FAILED"
    assert "steps[1].logits_digest" in report.reason("digests")
    assert not report.ok


def test_edited_token_fails_digests(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][4].update(token=l["steps"][4]["token"] + 1))
    _resign(root)
    report = verify_bundle(root)
    assert report.status("digests") == "FAILED"
    assert "steps[4].token" in report.reason("digests") and "argmax" in report.reason("digests")


def test_edited_token_text_fails_only_text(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][2].update(token_text="<b>forged</b>"))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["text"], report.format()
    assert "steps[2].token_text is '<b>forged</b>', recomputed" in report.reason("text")


def test_edited_tokenizer_file_fails_text(demo, tmp_path):
    root = _copy(demo, tmp_path)
    config = root / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"[EOS]"', '"[BOS]"', 1))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["text"], report.format()
    assert "tokenizer/tokenizer_config.json: BLAKE3" in report.reason("text") and "the ledger records" in \
        report.reason("text")


def test_edited_probability_fails_derivations_and_stop_reason_fails_continuity(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][0].update(probability=0.5, rank=3))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["derivations"], report.format()
    assert "steps[0].probability is 0.5, recomputed" in report.reason("derivations")
    root = _copy(demo, tmp_path / "second")
    _edit_json(root, "ledger.json", lambda l: l.update(stopped={"reason": "eos", "token": l["steps"][-1]["token"]}))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["continuity"], report.format()
    assert "stopped is {'reason': 'eos'" in report.reason("continuity") and "the stop rules give {'reason': " \
        "'max_new_tokens'}" in report.reason("continuity")  # fmt: skip


def test_removed_non_perturbation_fails_non_perturbation(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    (root / "non_perturbation.json").unlink()
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["non-perturbation"], report.format()
    assert "non_perturbation.json: missing" in report.reason("non-perturbation")


def test_perturbed_proof_fails_non_perturbation(anchored, tmp_path):
    root = _copy(anchored, tmp_path)

    def change(proof):
        proof["bare"][1]["hidden_digest"] = "1" * 64

    _edit_json(root, "non_perturbation.json", change)
    _edit_json(root, "ledger.json", lambda l: change(l["non_perturbation"]))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["non-perturbation"], report.format()
    assert "bare and instrumented differ (entry 1: hidden_digest" in report.reason("non-perturbation")


def _edit_proof(root: Path, change) -> None:
    _edit_json(root, "non_perturbation.json", change)
    _edit_json(root, "ledger.json", lambda l: change(l["non_perturbation"]))
    _resign(root)


def test_the_proof_scope_is_checked_and_shown(demo, anchored, tmp_path):
    # run's default proves step 0, the anchor step; --prove all every step; the OK line says which
    first, every = (json.loads((b / "ledger.json").read_text())["non_perturbation"] for b in (demo, anchored))
    assert first["scope"] == "first" and [e["step"] for e in first["bare"]] == [0]
    assert every["scope"] == "all" and [e["step"] for e in every["bare"]] == [0, 1, 2]
    assert "scope first: step 0 of 5 proven" in verify_bundle(demo).reason("non-perturbation")
    assert verify_bundle(anchored).reason("non-perturbation") == "scope all: every step of 3 proven"
    # a scope of every step with a step left out, or an unknown scope, fails
    root = _copy(anchored, tmp_path / "short")
    _edit_proof(root, lambda p: [p[k].pop() for k in ("bare", "instrumented")])
    report = verify_bundle(root)
    assert report.failed == ["non-perturbation"], report.format()
    assert "instrumented does not match the ledger's steps (2 entries vs 3)" in report.reason("non-perturbation")
    root = _copy(demo, tmp_path / "unknown")
    _edit_proof(root, lambda p: p.update(scope="some"))
    assert verify_bundle(root).failed == ["schema", "non-perturbation"]
    # a first-step proof must be of the ledger's own step 0
    root = _copy(demo, tmp_path / "other-step")
    _edit_proof(root, lambda p: [p[k][0].update(token=p[k][0]["token"] + 1) for k in ("bare", "instrumented")])
    report = verify_bundle(root)
    assert report.failed == ["non-perturbation"], report.format()
    assert "instrumented does not match the ledger's step 0 (entry 0: token" in report.reason("non-perturbation")


def test_a_proof_written_before_scopes_existed_covers_every_step(demo, anchored, tmp_path):
    # such a ledger has no scope and proved every step: it keeps verifying; a step-0 proof without a
    # scope does not pass for one
    root = _copy(anchored, tmp_path / "old")
    _edit_proof(root, lambda p: p.pop("scope"))
    report = verify_bundle(root)
    assert report.ok and report.reason("non-perturbation") == "scope all: every step of 3 proven", report.format()
    root = _copy(demo, tmp_path / "unscoped")
    _edit_proof(root, lambda p: p.pop("scope"))
    report = verify_bundle(root)
    assert report.failed == ["non-perturbation"], report.format()
    assert "(1 entries vs 5)" in report.reason("non-perturbation")


def test_unknown_ledger_field_fails_schema_and_provenance(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][0].update(secret=1))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["schema", "provenance"], report.format()
    assert "ledger.json $.steps[0]" in report.reason("schema")
    assert "steps[].secret" in report.reason("provenance")


def test_a_version_1_ledger_is_named_as_such(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l.update(ledger_version=1, schema="urn:kimi-jax:schema:ledger:v1"))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["schema"], report.format()
    reason = report.reason("schema")
    assert reason.startswith("ledger.json: ledger_version is 1 (schema 'urn:kimi-jax:schema:ledger:v1'), but this "
                             "kimi-jax verifies ledger version 2 (urn:kimi-jax:schema:ledger:v2)"), reason
    assert "version 2: checkpoint.config_digest is BLAKE3" in reason


def test_relabelled_provenance_fails_only_provenance(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "provenance.json", lambda p: p.update({"steps[].entropy": "measured"}))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["provenance"], report.format()
    assert "steps[].entropy: labelled 'measured', the schema says derived" in report.reason("provenance")


def test_edited_manifest_or_verdict_fails_the_receipt(demo, tmp_path):
    root = _copy(demo, tmp_path)
    _edit_json(root, "manifest.json", lambda m: m["storage"].update(prefetch=False))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["receipt"], report.format()
    assert "manifest.json: its identity digest is" in report.reason("receipt")

    # An invalid manifest.json is reported by the manifest loader, with the line (and not the temp
    # folder an archive was unpacked into).
    root = _copy(demo, tmp_path / "m")
    _edit_json(root, "manifest.json", lambda m: m["generate"].update(max_new_tokens=0))
    _resign(root)
    line = next(n for n, text in enumerate((root / "manifest.json").read_text().splitlines(), 1)
                if '"max_new_tokens"' in text)  # fmt: skip
    archive = archive_bundle(root, tmp_path / "m.tar.gz")
    for where in (root, archive):
        reason = verify_bundle(where).reason("receipt")
        assert f"manifest.json:{line}: generate.max_new_tokens: must be >= 1, got 0" in reason, reason
        assert "kimi-jax-bundle-" not in reason

    root = _copy(demo, tmp_path / "c")
    _edit_json(root, "ledger.json", lambda l: l["run"].update(capture=["norms"]))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["receipt"], report.format()
    assert "ledger.json run.capture is ['norms'], but manifest.json capture is" in report.reason("receipt")

    root = _copy(demo, tmp_path / "b")
    _edit_json(root, RECEIPT, lambda r: r["verdict"]["tokens"].__setitem__(0, 3))
    report = verify_bundle(root)
    assert report.failed == ["receipt"], report.format()
    assert "verdict.tokens" in report.reason("receipt")


def test_edited_anchor_fails_anchor(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    _edit_json(root, "anchor.json", lambda a: a.update(bytes_read=a["bytes_read"] + 1))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["anchor"], report.format()
    reason = report.reason("anchor")
    assert "steps[0].bytes_read" in reason and "BLAKE3(anchor.json)" in reason

    root = _copy(anchored, tmp_path / "b")
    (root / "anchor.json").unlink()
    _resign(root)
    assert "anchor.json: missing" in verify_bundle(root).reason("anchor")


# -- the explorer page --------------------------------------------------------------------------


def test_explorer_page_must_be_the_rendered_page_byte_for_byte(demo, tmp_path):
    root = _copy(demo, tmp_path)
    page = (root / "explorer.html").read_text(encoding="utf-8")

    # a planted script, resealed: every other check passes, the page is not the rendered one
    (root / "explorer.html").write_text(page.replace("</body>", "<script>fetch('//evil')</script></body>"),
                                        encoding="utf-8")  # fmt: skip
    _reseal(root)
    report = verify_bundle(root)
    assert report.failed == ["explorer"], report.format()
    assert "explorer.html: not the page rendered from ledger.json (first difference at byte" in report.reason("explorer")

    # a page embedding another ledger: named where the embedded ledger differs
    ledger = json.loads((root / "ledger.json").read_text())
    ledger["steps"][0]["token"] += 1
    _write_page(root, ledger_text=json.dumps(ledger))
    _reseal(root)
    report = verify_bundle(root)
    # the page now shows what the ledger does not hold: explorer scope fails too, and so the note's
    # certification table (written when it passed) is no longer what the bundle renders to
    assert report.failed == ["explorer", "explorer-scope", "note"], report.format()
    assert "differs from ledger.json (first at steps[0].token)" in report.reason("explorer")
    assert "#ledger-data is not ledger.json" in report.reason("explorer-scope")
    assert "certification.json: not the certification.json rendered" in report.reason("note")

    _write_page(root, extra='<script type="application/json" id="other">{"a": 1}</script>\n')
    _reseal(root)
    report = verify_bundle(root)
    assert report.failed == ["explorer", "explorer-scope", "note"], report.format()
    assert "other JSON data blocks (ids other)" in report.reason("explorer")
    assert "data blocks ['ledger-data', 'other']" in report.reason("explorer-scope")


def test_rendered_explorer_page_verifies(demo, tmp_path):
    root = _copy(demo, tmp_path)
    (root / "explorer.html").unlink()
    assert verify_bundle(root).status("explorer") == "SKIPPED"
    write_explorer(root)
    _reseal(root)
    report = verify_bundle(root)
    assert report.status("explorer") == "OK", report.format()


# -- replay -------------------------------------------------------------------------------------


def test_replay_matches_and_catches_an_edited_measurement(anchored, tmp_path):
    report = verify_bundle(anchored, replay=True)
    assert [c.name for c in report.checks][-1] == "replay" and report.checks[-1].number == len(CHECK_NAMES) + 1
    assert report.status("replay") == "OK" and report.ok, report.format()

    root = _copy(anchored, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][1]["layers"][2].update(norm_out=1.5))
    _resign(root)
    assert verify_bundle(root).ok  # a measured norm cannot be checked without the model ...
    report = verify_bundle(root, replay=True)
    assert report.failed == ["replay"], report.format()  # ... but replaying the run catches it
    assert "steps[1].layers[2].norm_out: bundle 1.5, replay" in report.reason("replay")


@pytest.fixture(scope="module")
def legacy(tiny_checkpoints, tmp_path_factory):
    """An anchored bundle as kimi-jax 0.1.0 wrote it: weights rounded to bf16 (what bf16-rounded
    computes, bit for bit), and no dequantization mode in manifest.json, the ledger (version 1) or
    the anchor (version 1)."""
    tmp = tmp_path_factory.mktemp("verify-legacy")
    manifest = tmp / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {tiny_checkpoints['kimi-k2.5']}\nprompt:\n"
                        f"  tokens: [7, 300, 7]\ngenerate:\n  max_new_tokens: 2\nanchor: anchor.json\n"
                        f"output:\n  dir: bundle\n")  # fmt: skip
    rounded = ["--set", "compute.dequant=bf16-rounded"]
    frozen = CliRunner().invoke(main, ["anchor", "freeze", str(manifest), *rounded])
    assert frozen.exit_code == 0, frozen.output
    execute(load_plan(str(manifest), rounded[1:]), echo=_quiet, progress=False)
    root = tmp / "bundle"
    _edit_json(root, "manifest.json", lambda m: m["compute"].pop("dequant"))
    _edit_json(root, "anchor.json", lambda a: (a.pop("dequant"), a.update(anchor_version=1)))
    digest = manifest_digest(json.loads((root / "manifest.json").read_text()))
    anchor_digest = blake3.blake3((root / "anchor.json").read_bytes()).hexdigest()
    _edit_json(root, "ledger.json", lambda l: (l["run"].pop("dequant"), l.update(
        ledger_version=1, schema="urn:kimi-jax:schema:ledger:v1", manifest_digest=digest),
        l["anchor"].update(anchor_digest=anchor_digest)))  # fmt: skip
    _edit_json(root, "provenance.json", lambda p: p.pop("run.dequant"))
    _edit_json(root, RECEIPT, lambda r: (r.update(manifest_digest=digest), r["anchor"].update(digest=anchor_digest)))
    _resign(root)
    return root


def test_legacy_bundle_fails_naming_the_dequantization_mode(legacy):
    report = verify_bundle(legacy, replay=True)
    statuses = _statuses(report)
    assert statuses["checksums"] == statuses["receipt"] == statuses["digests"] == "OK", report.format()
    assert statuses["schema"] == statuses["anchor"] == statuses["replay"] == "FAILED", report.format()
    # a bundle that fails an offline check is not re-run (issue 16)
    assert report.reason("replay").startswith("not replayed: the offline check(s) schema, ")
    assert "anchor FAILED" in report.reason("replay")
    assert "run.dequant records how quantized weights were dequantized" in report.reason("schema")
    assert report.reason("anchor").startswith(
        "anchor.json: anchor_version is 1, expected 2 (a version-1 anchor was computed with dequantization "
        "bf16-rounded (kimi-jax 0.1.0, which did not record the mode))")
    # the anchor's other conditions agree with the ledger's run, the mode included (both read as bf16-rounded)
    assert "frozen for a different run" not in report.reason("anchor")
    # what the replay would say of it, had it run: both modes named
    ledger = json.loads((legacy / "ledger.json").read_text())
    assert dequant_difference(ledger, {"run": {"dequant": "exact"}}) == (
        "the bundle was computed with dequantization bf16-rounded (kimi-jax 0.1.0, which did not record the mode) "
        "and the replay with exact, so their quantized weights differ; ")
    assert "run.dequant: bundle '<absent>', replay 'exact'" in "\n".join(
        replay_differences(ledger, {**ledger, "run": {**ledger["run"], "dequant": "exact"}}))


def test_anchor_of_the_other_dequantization_mode_fails_anchor(anchored, tmp_path):
    root = _copy(anchored, tmp_path)
    _edit_json(root, "anchor.json", lambda a: a.update(dequant="bf16-rounded"))
    _resign(root)
    report = verify_bundle(root)
    assert report.failed == ["anchor"], report.format()
    assert ("anchor.json was frozen for a different run: dequant (dequantization mode of quantized weights): "
            "anchor bf16-rounded, this run exact") in report.reason("anchor")  # fmt: skip


def _point_at(root: Path, model: dict) -> None:
    """A consistent forgery: manifest.json names another model, and the ledger and receipt follow."""
    _edit_json(root, "manifest.json", lambda m: m.update(model=model))
    digest = manifest_digest(json.loads((root / "manifest.json").read_text()))
    path = model.get("checkpoint")

    def follow(ledger):
        ledger["manifest_digest"] = digest
        if path is not None:
            ledger["checkpoint"]["path"] = path

    _edit_json(root, "ledger.json", follow)
    _edit_json(root, RECEIPT, lambda r: r.update(manifest_digest=digest))
    _resign(root)


def test_replay_needs_the_checkpoint(demo, tmp_path):
    root = _copy(demo, tmp_path)
    gone = tmp_path / "gone"
    _point_at(root, {"checkpoint": str(gone), "synthetic": None, "cache_dir": str(tmp_path)})
    report = verify_bundle(root, replay=True)
    assert report.failed == ["replay"], report.format()
    assert f"checkpoint directory {gone} does not exist" in report.reason("replay")
    assert "which must exist" in report.reason("replay")


def test_replay_runs_only_a_bundle_that_passed_the_offline_checks(demo, tmp_path, monkeypatch):
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("KIMI_JAX_CACHE", str(cache))
    root = _copy(demo, tmp_path)
    _edit_json(root, "ledger.json", lambda l: l["steps"][1].update(entropy=1.0))  # not resealed
    report = verify_bundle(root, replay=True)
    assert report.status("replay") == "FAILED"
    assert report.reason("replay").startswith("not replayed: the offline check(s) checksums, derivations, explorer, "
                                              "explorer-scope, note FAILED")  # fmt: skip
    assert not cache.exists(), "a bundle that failed verification made the replay write"


def test_replay_writes_only_into_the_users_cache(demo, tmp_path, monkeypatch):
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("KIMI_JAX_CACHE", str(cache))
    root = _copy(demo, tmp_path)
    chosen = tmp_path / "bundle-chosen"
    _edit_json(root, "manifest.json", lambda m: m["model"].update(cache_dir=str(chosen)))  # not in the digest
    _resign(root)
    report = verify_bundle(root, replay=True)
    assert report.status("replay") == "OK", report.format()
    assert not chosen.exists(), "replay wrote where the bundle said"
    assert list((cache / "synthetic").iterdir()), "the synthetic checkpoint goes into the user's cache"


def test_replay_refuses_the_full_shape_preset_unless_asked(demo, tmp_path, monkeypatch):
    from kimi_jax.verify.bundle_view import BundleView
    from kimi_jax.verify.replay import check_replay
    from kimi_jax.verify.report import CheckFailed

    root = _copy(demo, tmp_path)
    _edit_json(root, "manifest.json", lambda m: m["model"]["synthetic"].update(preset="full-shape"))
    with pytest.raises(CheckFailed, match="writes a sparse 595 GB checkpoint into your cache; pass --allow-large"):
        check_replay(BundleView(root))


def test_a_bundle_named_by_a_relative_path_verifies(small_bundle, monkeypatch):
    """`kimi-jax verify runs/demo`, as the README's newcomer types it: the note's re-rendering read the
    arrays through a file:// URL of the relative path (a host name, not a folder), said 'not
    recorded' for the dimensions the stored arrays give, and check 16 failed."""
    monkeypatch.chdir(small_bundle.parent)
    result = CliRunner().invoke(main, ["verify", small_bundle.name])
    assert result.exit_code == 0 and "0 FAILED" in result.output and "note: OK" in result.output, result.output
