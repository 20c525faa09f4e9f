"""A verifier must run on a machine that cannot run the model: storage, ledger and verify import no
JAX, and neither do ``kimi-jax --help``, ``kimi-jax verify`` and ``kimi-jax compare`` of bundles.

Each check runs in a fresh interpreter (this test process has long imported JAX) and reads
``sys.modules`` when that interpreter exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_jax.ledger.archive import archive_bundle
from kimi_jax.run.plan import load_plan
from kimi_jax.run.runner import execute

REPO = Path(__file__).resolve().parents[1]
JAX_FREE_PACKAGES = ("kimi_jax.storage", "kimi_jax.ledger", "kimi_jax.verify")

# Runs a command (module name, argv) or imports every module of some packages, and on exit writes
# the JAX modules then loaded to the file named by KIMI_JAX_MODULES_OUT.
WRAPPER = """
import atexit, importlib, json, os, pkgutil, runpy, sys

def record():
    with open(os.environ["KIMI_JAX_MODULES_OUT"], "w") as f:
        json.dump({"jax": sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib"))),
                   "imported": sorted(m for m in sys.modules if m.startswith("kimi_jax"))}, f)

atexit.register(record)
if sys.argv[1] == "--import":
    for package in sys.argv[2:]:
        path = importlib.import_module(package).__path__
        for info in pkgutil.walk_packages(path, package + "."):
            importlib.import_module(info.name)
else:
    sys.argv = ["kimi-jax", *sys.argv[2:]]
    runpy.run_module("kimi_jax.cli", run_name="__main__")
"""


def loaded_after(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KIMI_JAX_MODULES_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("no-jax") / "demo"
    execute(load_plan(str(REPO / "manifests" / "demo.yaml"), out_dir=str(out)), echo=lambda *_: None, progress=False)
    return out


def test_storage_ledger_and_verify_import_no_jax(tmp_path):
    proc, modules = loaded_after(tmp_path, "--import", *JAX_FREE_PACKAGES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kimi_jax.verify.replay" in modules["imported"] and "kimi_jax.storage.synth" in modules["imported"]
    assert modules["jax"] == []


def test_help_imports_no_jax(tmp_path):
    proc, modules = loaded_after(tmp_path, "--run", "--help")
    assert proc.returncode == 0 and "vindex" in proc.stdout, proc.stderr[-3000:]
    assert modules["jax"] == []


def test_verify_and_compare_of_bundles_import_no_jax(bundle, tmp_path):
    archive = archive_bundle(bundle, tmp_path / "demo.tar.gz")
    for command in (["verify", str(bundle)], ["verify", str(archive)], ["compare", str(bundle), str(archive)]):
        proc, modules = loaded_after(tmp_path, "--run", *command)
        assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
        assert "VERIFIED" in proc.stdout or "IDENTICAL" in proc.stdout, proc.stdout
        assert modules["jax"] == [], (command, modules["jax"])


def test_the_wrapper_sees_jax_when_it_is_imported(tmp_path):
    proc, modules = loaded_after(tmp_path, "--import", "kimi_jax.model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jax" in modules["jax"]
