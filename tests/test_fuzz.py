"""Property-based fuzzing (tests/fuzz_targets.py), one child process per target under RLIMIT_AS.

In CI each target runs a fixed, derandomized set of examples (FUZZ_EXAMPLES), a minute or so in
all. For a long local run set ``KIMI_JAX_FUZZ_MINUTES`` (e.g. 10): the minutes are shared among
the targets, each keeps generating new random examples until its share is used, and the number
of examples per target is printed and written to ``$TMPDIR/kimi-jax-fuzz-counts.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Examples per target in CI: the bundle target verifies, compares and renders a bundle each time.
FUZZ_EXAMPLES = {"safetensors": 150, "manifest": 200, "bundle": 12, "archive": 200, "template": 150, "tokenizer": 40,
                 "digest": 150, "remote": 30, "vindex": 150}  # fmt: skip
MEMORY_BOUND = 2 << 30  # the same bound as the hostile corpus (tests/test_hostile_inputs.py)


@pytest.mark.parametrize("target", sorted(FUZZ_EXAMPLES))
def test_fuzz_target(target, tiny_checkpoints, small_bundle, tmp_path):
    minutes = float(os.environ.get("KIMI_JAX_FUZZ_MINUTES") or 0)
    budget = ["--seconds", str(minutes * 60 / len(FUZZ_EXAMPLES)), "--examples", "200"] if minutes else \
        ["--examples", str(FUZZ_EXAMPLES[target]), "--derandomize"]  # fmt: skip
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "MALLOC_ARENA_MAX": "2"}
    child = subprocess.run([sys.executable, "-m", "tests.fuzz_targets", target, "--checkpoint",
                            str(tiny_checkpoints["kimi-k2.5"]), "--bundle", str(small_bundle), "--work",
                            str(tmp_path / "work"), "--bound-bytes", str(MEMORY_BOUND), "--report",
                            str(tmp_path / "report.json"), *budget], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600 + minutes * 60)  # fmt: skip
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-6000:]
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["examples"] >= min(FUZZ_EXAMPLES[target], 10)
    assert summary["peak_address_space"] <= summary["address_space_limit"]
    if minutes:
        counts = Path(tempfile.gettempdir()) / "kimi-jax-fuzz-counts.json"
        known = json.loads(counts.read_text()) if counts.exists() else {}
        counts.write_text(json.dumps({**known, target: summary}, indent=1))
        print(f"\nfuzz {target}: {summary['examples']} examples in {summary['seconds']} s")
