"""Every benchmark script runs end to end in its smoke size, so none can rot (no timing asserts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def script_tmp(tmp_path_factory, monkeypatch):
    """A script's own temporary files (vindex_phase1's RESULTS-vindex-smoke.md, accelerate's offload
    folder) land in pytest's folder; a short name, since Chromium's socket path there must stay
    under 108 characters."""
    folder = tmp_path_factory.mktemp("t")
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def _smoke(script: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:  # one indented JSON document, or one JSON record per line
        records = [json.loads(proc.stdout)]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, proc.stdout
    assert not any("error" in r for r in records), records
    return records


def test_scale_smoke():
    records = _smoke("scale.py", "--floor")
    assert any(r.get("run") == "one-token" and r["bytes_equal_prediction"] for r in records)
    # the floor reads what a one-token step needs from storage: its bytes, less the embedding row
    floor, one = (next(r for r in records if r.get("run") == run) for run in ("read-floor", "one-token"))
    assert 0 < floor["bytes"] <= one["bytes_read"][0] and floor["wall_s"] > 0


def test_io_smoke():
    (record,) = _smoke("io.py")
    assert record["bytes_exact"] is True


def test_matmul_smoke():
    records = [r for r in _smoke("matmul.py") if "format" in r]
    assert {r["format"] for r in records} == {"bf16", "int4"}
    assert all(r["max_rel_diff"] < 1e-5 for r in records)


def test_kernels_smoke():
    records = _smoke("cpu_kernels.py")
    cases = [r for r in records if "kernel" in r]
    assert {"int4", "bf16", "fp8", "routed experts (int4)"} <= {r["kernel"] for r in cases}
    assert all(r.get("max_rel_diff_vs_stored", 0) < 1e-5 and r.get("max_rel_diff_vs_xla", 0) < 1e-5 for r in cases)
    assert next(r["bandwidth"] for r in records if "bandwidth" in r)["read_gbs"] > 0
    threading = next(r["threading"] for r in records if "threading" in r)
    assert all(set(pools) == {"one thread", "own pool", "XLA's pool"} for pools in threading.values())


def test_capture_overhead_smoke():
    (record,) = _smoke("capture_overhead.py")
    assert record["bare_s"] > 0 and record["instrumented_s"] > 0


def test_peers_smoke():
    pytest.importorskip("accelerate")
    records = _smoke("peers.py")
    systems = {r["system"] for r in records if "system" in r}
    assert {"transformers-memory", "transformers-disk-offload", "kimi-jax-kv", "kimi-jax-no-kv", "kimi-jax-kv-bf16",
            "kimi-jax-kv-auto", "kimi-jax-kv-auto-bf16", "kimi-jax-kv-stream", "kimi-jax-defaults",
            "kimi-jax-defaults-bf16"} <= systems  # llama.cpp's when installed
    ratios = next(r for r in records if "ratios" in r)["ratios"]
    assert ratios["same_tokens_as_transformers"] is True


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_explorer_open_smoke():
    pytest.importorskip("playwright")
    _smoke("explorer_open.py")


def test_vindex_phase1_smoke(script_tmp):
    _smoke("vindex_phase1.py")
    assert (script_tmp / "RESULTS-vindex-smoke.md").is_file()  # in pytest's folder, not the system's /tmp


def test_length_buckets_smoke():
    (record,) = _smoke("length_buckets.py")
    assert record["of_cases"] == 2 and set(record["compile_s_per_new_length"]) == {"3", "5"}


def test_remote_smoke():
    pytest.importorskip("aiohttp")
    (record,) = _smoke("remote.py")
    assert record["same_tokens"] and record["same_weights_digest"]
    assert all(r["bytes_network"] == r["bytes"] for r in record["http"].values())


def test_bf16_tolerance_smoke():
    records = _smoke("bf16_tolerance.py")
    summary = next(r for r in records if r.get("benchmark") == "bf16_tolerance")
    assert summary["steps_compared"] == 4 and 0 < summary["max_rel_err"] < 1


def test_scaleout_smoke():
    records = [r for r in _smoke("scaleout.py") if "processes" in r]
    assert sorted(r["processes"] for r in records) == [1, 2]
    for r in records:
        assert r["verified"] and r["same_tokens_as_one_device"] and r["total_bytes_equal_one_device"], r
    two = next(r for r in records if r["processes"] == 2)
    assert len(two["bytes_per_process_per_token"]) == 2 and 0.5 <= two["largest_share"] < 1


def test_device_check_runs_on_cpu():
    """tools/device-check waits for a GPU; its smoke size on CPU keeps it working until then."""
    tool = BENCH.parent / "tools" / "device-check"
    proc = subprocess.run([sys.executable, str(tool), "--smoke", "--allow-cpu"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert all(p["tokens_equal"] for p in summary["parity_vs_cpu"].values())
    assert summary["streamed"]["token_bytes"] == summary["cpu"]["token_bytes"] == summary["resident"]["token_bytes"]
    assert summary["streamed"]["token_bytes_from_storage"] > summary["resident"]["token_bytes_from_storage"]
    assert summary["resident"]["load_bytes"] > 0 and summary["host_to_device"]["plain_device_put_gbs"] > 0


@pytest.mark.parametrize("budget", ["auto", "0"])
def test_decode_profile_smoke(budget):
    (record,) = _smoke("decode_profile.py", "--budget", budget)
    assert record["whole_model_program"] is (budget == "auto")
    assert record["decode_steps"] == 3 and record["stage_ms_per_step"]
    if budget == "auto":
        assert set(record["programs_alone_ms"]) >= {"whole_model_program", "head", "moe_experts"}


def test_batch_smoke():
    records = _smoke("batch.py")
    batches = {r["batch"]: r for r in records if r.get("run") == "batch"}
    assert batches[3]["decoded_tokens"] == 3 * 2 and batches[1]["decoded_tokens"] == 2
    assert any(r.get("run") == "drafts" and r["drafts"] == 2 for r in records)


def test_batch_mtp_smoke():
    records = _smoke("batch.py", "--mtp", "--batches", "")
    runs = {r["drafts"]: r for r in records if r.get("run") == "mtp"}
    assert set(runs) == {0, 2} and runs[2]["drafted"] > 0 and runs[2]["draft_used_bytes"] > 0
    assert runs[0]["draft_used_bytes"] == 0 and any(r.get("run") == "break-even" for r in records)


def test_bf16_rows_smoke():
    records = [r for r in _smoke("bf16_rows.py") if "shape" in r]
    assert [r["rows"] for r in records] == [1, 8] and all(r["kernel_ms"] > 0 and r["xla_ms"] > 0 for r in records)


def test_prefill_smoke():
    records = _smoke("prefill.py")
    runs = [r for r in records if "chunk" in r]
    assert [r["chunk"] for r in runs] == [24, 8] and next(r for r in records if "same_token_every_chunk" in r)[
        "same_token_every_chunk"]
    # chunks of 8 read each layer's experts once per chunk: at least as many bytes as one pass
    assert runs[1]["bytes_used"] >= runs[0]["bytes_used"]


def test_serve_smoke():
    records = _smoke("serve.py")
    rounds = {r["concurrency"]: r for r in records if r.get("run") == "serve"}
    assert sorted(rounds) == [1, 2] and all(r["requests"] == 2 and r["tokens"] == 2 * 2 for r in rounds.values())
