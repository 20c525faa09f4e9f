"""The layout move changed no numbers: the demo at the last commit before it (5b0b83b) and in this
tree agree on every step's token, hidden and logits digests and bytes read (tools/demo_digests.py),
once this tree dequantizes as that revision did (``compute.dequant: bf16-rounded``). With the
default exact dequantization the same tokens come out, and every digest changes."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from kimi_jax.verify.checklist import verify_bundle

REPO = Path(__file__).resolve().parents[1]
BEFORE_THE_MOVE = "5b0b83b"  # "Name the attention half both layer kinds share": the flat package's last commit


def load_tool():
    spec = importlib.util.spec_from_file_location("demo_digests", REPO / "tools" / "demo_digests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def history_has(revision: str) -> bool:
    try:
        return subprocess.run(["git", "cat-file", "-e", f"{revision}^{{commit}}"], cwd=REPO,
                              capture_output=True).returncode == 0  # fmt: skip
    except OSError:  # no git at all
        return False


@pytest.mark.skipif(not history_has(BEFORE_THE_MOVE), reason=f"git history with commit {BEFORE_THE_MOVE} is not "
                                                               "available (a shallow clone or a source archive)")
def test_demo_is_bitwise_what_it_was_before_the_layout_move(tmp_path):
    tool = load_tool()
    before, after, problems = tool.compare_demo(BEFORE_THE_MOVE, tmp_path, ("compute.dequant=bf16-rounded",))
    assert problems == []
    assert [s["token"] for s in after] == [1457, 1924, 1487, 1487, 1108]
    exact = tool.demo_steps(tool.REPO, tmp_path / "exact")  # the default: exact products, no bf16 rounding
    assert [s["token"] for s in exact] == [s["token"] for s in before]
    assert all(a[k] != b[k] for a, b in zip(before, exact) for k in ("hidden_digest", "logits_digest"))
    assert [s["bytes_read"] for s in exact] == [s["bytes_read"] for s in before]
    # the comparison can fail: one changed digest is reported by step and field
    changed = [dict(s) for s in after]
    changed[3]["logits_digest"] = "0" * 64
    assert tool.differences(before, changed) == [f"step 3 logits_digest: {before[3]['logits_digest']!r} -> {'0' * 64!r}"]
    assert tool.file_differences({"config.json": "a", "model-1.safetensors": "b"}, {"config.json": "c"}) == [
        "checkpoint file config.json: different bytes", "checkpoint file model-1.safetensors: missing"]
    # that revision wrote ledger version 1 (BLAKE2b config digest); verify says so rather than failing obscurely
    reason = verify_bundle(tmp_path / "revision").reason("schema")
    assert reason.startswith("ledger.json: ledger_version is 1 (schema 'urn:kimi-jax:schema:ledger:v1'), but this "
                             "kimi-jax verifies ledger version 2"), reason
