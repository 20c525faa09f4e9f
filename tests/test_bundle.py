"""Bundles are atomic, b3sum-checkable, and a run killed mid-step resumes to identical digests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from kimi_jax.ledger.bundle import load_arrays
from kimi_jax.ledger.ledger import tensor_digest


def _manifest(tmp_path, ckpt, kv_cache: bool):
    path = tmp_path / f"m-{kv_cache}.yaml"
    path.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [1792, 5]\n"
                    f"generate:\n  max_new_tokens: 4\n  kv_cache: {str(kv_cache).lower()}\noutput:\n  dir: out\n")  # fmt: skip
    return path


def _run(manifest, out, *extra, fault=None):
    env = dict(os.environ)
    env.pop("KIMI_JAX_FAULT", None)
    if fault:
        env["KIMI_JAX_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "kimi_jax.cli", "run", str(manifest), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env)  # fmt: skip


def _identity(out):
    ledger = json.loads((out / "ledger.json").read_text())
    return [(s["context"], s["token"], s["logit"], s["hidden_digest"], s["logits_digest"], s["bytes_read"],
             [(l.get("norm_in"), l.get("experts"), l["bytes_read"]) for l in s["layers"]]) for s in ledger["steps"]]  # fmt: skip


@pytest.mark.parametrize("kv_cache", [False, True])
@pytest.mark.parametrize("fault", ["instrumented:2:1", "bare:1:3"])
def test_killed_run_resumes_to_identical_digests(tiny_checkpoints, tmp_path, kv_cache, fault):
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], kv_cache)
    run, step, _ = fault.split(":")
    prove = ("--prove", "all") if run == "bare" else ()  # by default only step 0 runs bare
    reference = _run(manifest, tmp_path / "ref", *prove)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    killed = _run(manifest, out, *prove, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave anything that looks like a bundle"
    work = tmp_path / ".out.work"
    assert sorted(p.name for p in (work / run).glob("*.json")) == [f"step_{i:05d}.json" for i in range(int(step))]

    resumed = _run(manifest, out, *prove, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{run}: resuming after {step} completed step(s)" in resumed.stderr
    assert _identity(out) == _identity(tmp_path / "ref")
    assert not work.exists()
    arrays = load_arrays(out)
    ledger = json.loads((out / "ledger.json").read_text())
    assert [tensor_digest(arrays[s["index"]][1]) for s in ledger["steps"]] == [s["hidden_digest"] for s in ledger["steps"]]


def test_resume_refuses_work_of_another_run(tiny_checkpoints, tmp_path):
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], False)
    assert _run(manifest, tmp_path / "out", fault="instrumented:1:0").returncode == -signal.SIGKILL
    other = _run(manifest, tmp_path / "out", "--resume", "--set", "prompt.tokens=[3]")
    assert other.returncode == 2 and "belong to a different run" in other.stderr and "manifest_digest" in other.stderr


def test_crash_leaves_previous_bundle_intact(tiny_checkpoints, tmp_path):
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], False)
    out = tmp_path / "out"
    assert _run(manifest, out).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _run(manifest, out, "--set", "prompt.tokens=[9]", fault="instrumented:0:2").returncode == -signal.SIGKILL
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.skipif(shutil.which("b3sum") is None, reason="b3sum is not installed")
def test_checksums_pass_b3sum_check(tiny_checkpoints, tmp_path):
    manifest = _manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], True)
    assert _run(manifest, tmp_path / "out").returncode == 0
    check = subprocess.run(["b3sum", "--check", "CHECKSUMS.b3"], cwd=tmp_path / "out", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ledger.json: OK" in check.stdout and "FAILED" not in check.stdout
