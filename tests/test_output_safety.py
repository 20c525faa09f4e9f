"""A run owns its output folder: one run at a time, nothing but a provable bundle replaced, the
folder checked before compute, a full or read-only disk named, SIGINT resumable, one file mode,
and a bug reported in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.fileio import current_umask
from kimi_jax.run.output import hold_output
from kimi_jax.verify.checklist import verify_bundle

REPO = Path(__file__).resolve().parents[1]


def _manifest(tmp: Path, ckpt: Path, out: Path, tokens: str = "[7, 300]") -> Path:
    path = tmp / f"m-{out.name}.yaml"
    path.write_text(f"version: 1\nmodel: {{checkpoint: {ckpt}}}\nprompt: {{tokens: {tokens}}}\n"
                    f"generate: {{max_new_tokens: 2}}\noutput: {{dir: {out}}}\n")  # fmt: skip
    return path


def _ledger_steps(bundle: Path) -> list:
    return [(s["token"], s["hidden_digest"], s["logits_digest"]) for s in
            json.loads((bundle / "ledger.json").read_text())["steps"]]  # fmt: skip


def test_a_held_output_folder_makes_a_second_run_fail_at_once(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], out)
    with hold_output(out):
        for extra in ([], ["--resume"]):
            result = CliRunner().invoke(main, ["run", str(manifest), *extra])
            assert result.exit_code == 2, result.output
            assert f"{out}: another kimi-jax run (PID {os.getpid()}) is writing this output folder" in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", manifest.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [manifest.name], "the lock file is removed"


def test_two_runs_racing_for_one_folder_leave_one_verified_bundle(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], out)
    runs = [subprocess.Popen([sys.executable, "-m", "kimi_jax.cli", "run", str(manifest)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for code, err in results:  # the loser is refused at once; or it came second and replaced a bundle
        assert code == 0 or (code == 2 and "another kimi-jax run (PID" in err), err[-2000:]
    assert any(code == 0 for code, _ in results)
    assert verify_bundle(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [manifest.name, "out"], "no .out.* left behind"


def test_only_a_provable_bundle_is_replaced_and_only_after_checking_before_compute(tiny_checkpoints, small_bundle,
                                                                                  tmp_path):  # fmt: skip
    ckpt = tiny_checkpoints["kimi-k2.5"]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "ledger.json").write_text("{}")
    (thesis / "receipt.json").write_text("{}")
    (thesis / "chapter1.tex").write_text("years of work")
    extended = Path(shutil.copytree(small_bundle, tmp_path / "extended"))
    (extended / "notes.txt").write_text("mine")  # a bundle the user added a file to is no longer only a bundle
    for folder, why in ((thesis, "it is a non-empty folder that is not a kimi-jax bundle"),
                        (extended, "it holds files that are not part of its bundle (" + str(extended / "notes.txt"))):  # fmt: skip
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        result = CliRunner().invoke(main, ["run", str(_manifest(tmp_path, ckpt, folder))])
        assert result.exit_code == 2 and f"{folder}: refusing to write the bundle there: {why}" in result.output
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
        assert not (tmp_path / f".{folder.name}.work").exists(), "refused before compute"

    bundle = Path(shutil.copytree(small_bundle, tmp_path / "bundle"))
    result = CliRunner().invoke(main, ["run", str(_manifest(tmp_path, ckpt, bundle, tokens="[9]"))])
    assert result.exit_code == 0, result.output
    assert json.loads((bundle / "ledger.json").read_text())["run"]["prompt"] == [9] and verify_bundle(bundle).ok


def test_sigint_says_resume_continues_and_resume_does(tiny_checkpoints, small_bundle, tmp_path, monkeypatch):
    out = tmp_path / "out"
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], out)  # the run small_bundle holds
    monkeypatch.setenv("KIMI_JAX_FAULT", "instrumented:1:0:SIGINT")
    # Ctrl-C as a terminal delivers it: Python's own handler (a run of the whole suite once found
    # another left in place by an earlier in-process test, and the SIGINT went unnoticed)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stopped = CliRunner().invoke(main, ["run", str(manifest)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.exit_code == 130, stopped.output
    assert ("interrupted; the completed steps are kept beside the output folder: run the same command with "
            "--resume to continue") in stopped.output and "Aborted" not in stopped.output  # fmt: skip
    assert not out.exists() and not (tmp_path / ".out.partial").exists() and not (tmp_path / ".out.lock").exists()
    monkeypatch.delenv("KIMI_JAX_FAULT")
    resumed = CliRunner().invoke(main, ["run", str(manifest), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "instrumented: resuming after 1 completed step(s)" in resumed.output
    assert _ledger_steps(out) == _ledger_steps(small_bundle)


def test_bundle_files_share_one_mode_set_by_the_umask(small_bundle):
    files = {p.stat().st_mode & 0o777 for p in small_bundle.rglob("*") if p.is_file()}
    folders = {p.stat().st_mode & 0o777 for p in [small_bundle, *small_bundle.rglob("*")] if p.is_dir()}
    assert files == {0o666 & ~current_umask()}, [oct(m) for m in files]
    assert folders == {0o777 & ~current_umask()}, [oct(m) for m in folders]


def test_any_other_exception_is_one_line_naming_the_saved_traceback(tmp_path, monkeypatch):
    def broken(_):
        raise RuntimeError("the index exploded\nsecond line")

    monkeypatch.setattr("kimi_jax.storage.checkpoint.open_checkpoint", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 70
    lines = result.output.strip().splitlines()
    saved = next(tmp_path.glob("kimi-jax-internal-error-*.txt"))
    assert lines == [f"internal error: RuntimeError: the index exploded (a bug in kimi-jax; the traceback was saved "
                     f"to {saved})"]  # fmt: skip
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text and "inspect" in text


# -- a real full and read-only disk (a small tmpfs in a private mount namespace) ---------------------

_DISK = """
import os, subprocess, sys
from pathlib import Path
from click.testing import CliRunner
from kimi_jax.cli import main
disk, report, manifest = (Path(p) for p in sys.argv[1:4])
mount = lambda *opts: subprocess.run(["mount", *opts], check=True)
mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk))
runner = CliRunner()
def record(name, argv):
    result = runner.invoke(main, argv)
    (report / name).write_text(f"{result.exit_code}\\n{result.output}")
record("full", ["run", str(manifest), "--out", str(disk / "out")])
(report / "full.ls").write_text("\\n".join(os.listdir(disk)))
mount("-o", "remount,size=8m", str(disk))
record("resume", ["run", str(manifest), "--out", str(disk / "out"), "--resume"])
record("verify", ["verify", str(disk / "out")])
mount("-o", "remount,ro", str(disk))
record("read-only", ["run", str(manifest), "--out", str(disk / "again")])
"""


def test_a_full_disk_is_named_and_resume_finishes_once_there_is_room(tiny_checkpoints, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private mount namespace")
    disk, report = tmp_path / "disk", tmp_path / "report"
    disk.mkdir()
    report.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1k", "tmpfs", str(disk)],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here ({probe.stderr.strip()[:80]})")
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], tmp_path / "unused")
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", _DISK, str(disk), str(report), str(manifest)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    code, output = {}, {}
    for name in ("full", "resume", "verify", "read-only"):
        code[name], output[name] = (report / name).read_text().split("\n", 1)
    assert code["full"] == "2", output["full"][-2000:]
    assert "no space left on device [ENOSPC]" in output["full"] and "--resume" in output["full"]
    assert "Traceback" not in output["full"] and "internal error" not in output["full"]
    left = (report / "full.ls").read_text().split()
    assert ".out.work" in left and not any(n.startswith(".out.partial") for n in left) and "out" not in left, left
    assert code["resume"] == "0", output["resume"][-2000:]
    assert "resuming after 2 completed step(s)" in output["resume"]
    assert code["verify"] == "0", output["verify"]
    assert code["read-only"] == "2" and "read-only file system [EROFS]" in output["read-only"], output["read-only"]


def test_a_rust_panic_is_one_line_too(tmp_path, monkeypatch):
    """pyo3's PanicException derives from BaseException: on main it escaped the CLI's handler as a raw
    traceback with exit 1, the code of a failed verify check."""
    PanicException = type("PanicException", (BaseException,), {})  # what pyo3 raises, by name

    def panics(_):
        raise PanicException("Onig: Regex search error: retry-limit-in-match over")

    monkeypatch.setattr("kimi_jax.storage.checkpoint.open_checkpoint", panics)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 70
    assert result.output.startswith("internal error: PanicException: Onig: Regex search error") and \
        len(result.output.strip().splitlines()) == 1  # fmt: skip


def test_a_reader_that_stops_reading_ends_the_command_quietly(small_bundle, tmp_path):
    """`kimi-jax verify B | head -1` ended in BrokenPipeError and an internal error on main."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-m", "kimi_jax.cli", "verify", str(small_bundle)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=REPO)  # fmt: skip
    first = child.stdout.readline()
    child.stdout.close()  # as `head -1` does once it has its line
    _, err = child.communicate(timeout=300)
    assert first.startswith(b"1. checksums: OK")
    assert child.returncode == 141 and err == b"", err.decode()[-2000:]
    assert not list(tmp_path.glob("kimi-jax-internal-error-*")), "a traceback file was written"
