"""Device meshes: the manifest fields, the expert deal, and per-process reads onto 8 CPU devices.

Jobs that need 8 devices run in one subprocess (tests/mesh_worker.py): XLA_FLAGS must be set
before JAX initialises, which this process has already done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kimi_jax.errors import ManifestError
from kimi_jax.model.slots import deal_expert_slots
from kimi_jax.run.distributed import settings_from
from kimi_jax.manifest import load_manifest
from kimi_jax.storage.safetensors_header import TensorRecord

WORKER = Path(__file__).with_name("mesh_worker.py")


def run_worker(jobs: list[dict], workers: int = 1, timeout: int = 900) -> list[dict]:
    """Results of ``jobs``, in order, from ``workers`` concurrent worker processes (jobs dealt round-robin)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    shares = [jobs[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(share)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for share in shares]  # fmt: skip
    results: list[list[dict]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-4000:]
        results.append([json.loads(line)["result"] for line in out.splitlines() if line.startswith("{")])
    return [results[i % workers][i // workers] for i in range(len(jobs))]


# -- manifest ----------------------------------------------------------------------------------


def _manifest_file(tmp_path, body: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\nmodel:\n  synthetic: {preset: tiny}\nprompt:\n  tokens: [1]\noutput:\n  dir: out\n" + body)
    return path


def test_mesh_fields_are_validated_with_file_and_line(tmp_path):
    path = _manifest_file(tmp_path, "compute:\n  mesh:\n    expert: 0\n    modle: 2\n    placement: pinned\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    text = str(e.value)
    assert f"{path}:10: compute.mesh.expert: must be >= 1, got 0" in text
    assert f"{path}:11: compute.mesh.modle: unknown key (did you mean 'model'?)" in text
    assert f"{path}:12: compute.mesh.placement: must be one of 'streamed' or 'resident', got string 'pinned'" in text


def test_no_mesh_keeps_the_manifest_identity_and_a_mesh_changes_it(tmp_path):
    plain = load_manifest(_manifest_file(tmp_path, ""))
    explicit = load_manifest(_manifest_file(tmp_path, "compute: {dtype: float32}\n"))
    meshed = load_manifest(_manifest_file(tmp_path, "compute: {mesh: {expert: 2, model: 4}}\n"))
    assert plain.digest() == explicit.digest() != meshed.digest()
    assert "mesh" not in plain.resolved_dict()["compute"]
    assert meshed.resolved_dict()["compute"]["mesh"] == {"expert": 2, "model": 4, "placement": "streamed"}
    # how processes find each other is not what is computed: every process has the same identity
    launched = load_manifest(_manifest_file(tmp_path, "compute: {mesh: {expert: 2, model: 4}}\n"
                                                      "distributed: {coordinator: 'h:1', num_processes: 2, process_id: 1}\n"))  # fmt: skip
    assert launched.digest() == meshed.digest()


def test_distributed_settings_from_manifest_and_environment(tmp_path):
    mesh = "compute: {mesh: {expert: 2}}\n"
    m = load_manifest(_manifest_file(tmp_path, mesh + "distributed: {coordinator: 'node0:8476', num_processes: 2}\n"))
    s = settings_from(m, {"KIMI_JAX_PROCESS_ID": "1"})
    assert (s.coordinator, s.num_processes, s.process_id, s.timeout_s) == ("node0:8476", 2, 1, 300.0)
    assert settings_from(load_manifest(_manifest_file(tmp_path, mesh)), {}) is None
    env_only = settings_from(load_manifest(_manifest_file(tmp_path, mesh)), {
        "KIMI_JAX_COORDINATOR": "10.0.0.1:9", "KIMI_JAX_NUM_PROCESSES": "4", "KIMI_JAX_PROCESS_ID": "3"})  # fmt: skip
    assert (env_only.coordinator, env_only.num_processes, env_only.process_id) == ("10.0.0.1:9", 4, 3)
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: distributed.process_id: a multi-process run needs it: set "
                                            r"it in the manifest or in \$KIMI_JAX_PROCESS_ID"):  # fmt: skip
        settings_from(m, {})
    with pytest.raises(ManifestError, match=r"distributed.num_processes: the manifest says 2 but "
                                            r"\$KIMI_JAX_NUM_PROCESSES says 3; set it in one place"):  # fmt: skip
        settings_from(m, {"KIMI_JAX_PROCESS_ID": "0", "KIMI_JAX_NUM_PROCESSES": "3"})
    with pytest.raises(ManifestError, match=r"distributed.process_id: process id 2 is not in 0..1"):
        settings_from(m, {"KIMI_JAX_PROCESS_ID": "2"})
    with pytest.raises(ManifestError, match=r"distributed.process_id: \$KIMI_JAX_PROCESS_ID must be a non-negative "
                                            r"integer, got 'one'"):  # fmt: skip
        settings_from(m, {"KIMI_JAX_PROCESS_ID": "one"})
    no_mesh = load_manifest(_manifest_file(tmp_path, "distributed: {coordinator: 'h:1', num_processes: 2, process_id: 0}\n"))
    with pytest.raises(ManifestError, match=r"compute.mesh: a multi-process run needs a mesh"):
        settings_from(no_mesh, {})


def test_a_mesh_refuses_speculation_only(tiny_checkpoints, tmp_path):
    """A residency budget and stored matmuls run on a mesh (below); reading ahead the experts an
    early router predicts does not: a mesh deals the picked experts to its devices each step."""
    from kimi_jax.run.distributed import check_mesh
    from kimi_jax.run.plan import prepare_run

    path = _manifest_file(tmp_path, "compute: {mesh: {expert: 1, model: 1}, matmul: stored}\n"
                                    "storage: {resident_bytes: 1MiB}\n")  # fmt: skip
    path.write_text(path.read_text().replace("synthetic: {preset: tiny}", f"checkpoint: {tiny_checkpoints['kimi-k2.5']}"))
    check_mesh(prepare_run(load_manifest(path)))
    with pytest.raises(ManifestError, match=r"compute.mesh: storage.speculate \(true\) applies to one device"):
        check_mesh(prepare_run(load_manifest(path, ["storage.speculate=true"])))


@pytest.fixture(scope="module")
def digested(tiny_checkpoints, tmp_path_factory):
    import shutil

    from click.testing import CliRunner

    from kimi_jax.cli import main

    path = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path_factory.mktemp("digested") / "ckpt")
    # segments of 4 KiB, so a mesh checks its shares segment by segment
    assert CliRunner().invoke(main, ["digest", str(path), "--no-progress", "--segment-bytes", "4096"]).exit_code == 0
    return path


def test_digests_are_checked_on_a_mesh_of_one_process_and_name_what_one_device_names(digested):
    """One process reads whole tensors whatever its mesh, so each is checked against the digest file;
    each step's weights digest names the weights it used, as on one device: kept layers and a
    resident placement's experts count from memory, embedding rows under their row names."""
    job = {"job": "digests_on_a_mesh", "args": {"ckpt": str(digested), "meshes": [[2, 4, "streamed"],
                                                                                  [1, 8, "resident"]]}}  # fmt: skip
    (result,) = run_worker([job])
    assert all(d is not None for d in result["one"]) and len(set(result["one"])) == 3
    assert result["meshes"] == [result["one"], result["one"]]


def test_prompts_and_drafts_decode_on_a_mesh_as_on_one_device(tiny_checkpoints):
    """Sequences decoding together, and drafts verified in one pass, on a mesh of one process's
    devices: each sequence's tokens are the one-device run's, the logits within float32 rounding."""
    job = {"job": "prompts_on_a_mesh", "args": {"ckpt": str(tiny_checkpoints["kimi-k2.5"]),
                                                "meshes": [[2, 4, "streamed"], [1, 8, "resident"]]}}  # fmt: skip
    (result,) = run_worker([job])
    assert result["one_drafted"] > 0
    for mesh in result["meshes"]:
        assert mesh["tokens"] == result["one"]
        assert mesh["passes"] == result["one_passes"] and mesh["drafted"] == result["one_drafted"]
        assert mesh["logits_rel"] < 1e-4, mesh["logits_rel"]


def test_shared_passes_run_in_one_process_on_any_mesh(tiny_checkpoints, tmp_path):
    from kimi_jax.run.distributed import check_mesh
    from kimi_jax.run.plan import prepare_run

    path = _manifest_file(tmp_path, "compute: {mesh: {expert: 1, model: 1}}\n")
    path.write_text(path.read_text().replace("prompt:\n  tokens: [1]\n", "prompts:\n  - tokens: [1]\n  - tokens: [2, 3]\n"))
    plan = prepare_run(load_manifest(path))
    check_mesh(plan)
    with pytest.raises(ManifestError, match=r"prompts: shared passes \(prompts:, generate.drafts\) run in one process"):
        check_mesh(plan, processes=2)
    with pytest.raises(ManifestError, match=r"distributed: prompts decode in one process"):
        prepare_run(load_manifest(path, ["distributed.timeout_s=30"]))


def test_a_digest_file_without_segments_is_refused_only_when_processes_read_shares(digested, tmp_path):
    import json

    from kimi_jax.run.distributed import check_mesh
    from kimi_jax.run.plan import prepare_run

    path = _manifest_file(tmp_path, "compute: {mesh: {expert: 1, model: 1}}\n")
    path.write_text(path.read_text().replace("synthetic: {preset: tiny}", f"checkpoint: {digested}"))
    plan = prepare_run(load_manifest(path))
    assert plan.source.digests is not None
    check_mesh(plan)  # one process: every tensor whole, checked
    check_mesh(plan, processes=2)  # segments: each process checks its shares
    old = json.loads((digested / "checkpoint.b3.json").read_text())
    del old["segment_bytes"]  # as written before segments
    (tmp_path / "old.b3.json").write_text(json.dumps(old))
    plan = prepare_run(load_manifest(path, [f"storage.digest_file={tmp_path / 'old.b3.json'}"]))
    check_mesh(plan)
    with pytest.raises(ManifestError, match=r"compute.mesh: the digest file .*old.b3.json checks \d+ tensor\(s\) only "
                                            r"whole .* in a run of 2 processes each reads a share of their rows; write "
                                            r"it again with `kimi-jax digest`"):  # fmt: skip
        check_mesh(plan, processes=2)


# -- host-side planning ------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 2, 3, 8])
def test_experts_are_dealt_evenly_and_every_pick_finds_its_expert(devices):
    rng = np.random.default_rng(devices)
    for positions in (1, 3, 9):
        idx = np.stack([rng.choice(64, size=8, replace=False) for _ in range(positions)])
        stack_ids, slots = deal_expert_slots(idx, 64, devices)
        distinct = sorted(set(idx.ravel().tolist()))
        assert sorted(e for e in stack_ids if e is not None) == distinct  # each picked expert exactly once
        assert np.array_equal(np.vectorize(stack_ids.__getitem__)(slots), idx)
        assert len(stack_ids) % devices == 0 and len(stack_ids) >= len(distinct)
        block = len(stack_ids) // devices
        counts = [sum(e is not None for e in stack_ids[d * block : (d + 1) * block]) for d in range(devices)]
        assert max(counts) - min(counts) <= 1, counts


def test_row_range_is_the_rows_bytes():
    rec = TensorRecord("w", Path("s.safetensors"), offset=1000, nbytes=6 * 4 * 2, dtype="BF16", shape=(6, 4))
    part = rec.rows(2, 5)
    assert (part.offset, part.nbytes, part.shape) == (1000 + 2 * 8, 3 * 8, (3, 4))


# -- on 8 CPU devices --------------------------------------------------------------------------


def test_mesh_reads_equal_single_device_reads_bit_for_bit(tiny_checkpoints):
    jobs = [{"job": "mesh_mismatch", "args": {"expert": 3, "model": 2}}]
    cases = [("kimi-k2.5", 2, 4), ("kimi-k2-fp8", 8, 1), ("hf-bf16", 1, 8), ("deepseek-v3", 4, 2)]
    jobs += [{"job": "placement_reads", "args": {"ckpt": str(tiny_checkpoints[layout]), "expert": e, "model": m}}
             for layout, e, m in cases]  # fmt: skip
    mismatch, *reads = run_worker(jobs)
    assert mismatch["error"] == "expert x model = 3 x 2 = 6 devices, but 8 cpu device(s) are present (process 0: 8)"
    for (layout, e, m), r in zip(cases, reads):
        assert r["mismatched"] == [], (layout, r["mismatched"])
        assert r["mesh_bytes"] == r["single_bytes"], layout  # every byte read once, padding never read
        assert r["empty_slots_zero"] and r["slots_point_at_picks"], layout
        assert r["specs"] == ["P(('expert', 'model'),)"]  # slots split over every device: each holds what it read


# Greedy decoding on meshes vs one device. Each layout runs with and without the KV cache and meets
# every mesh shape across the rows below, so the matrix stays small: full recompute compiles one
# program per context length, so it runs 3 steps; the KV cache runs 16.
MESH_CASES = [
    ("kimi-k2.5", True, [[1, 8, "streamed"], [2, 4, "resident"]], False),
    ("kimi-k2.5", False, [[8, 1, "streamed"]], False),
    ("kimi-k2-fp8", True, [[2, 4, "streamed"]], True),
    ("kimi-k2-fp8", False, [[1, 8, "streamed"]], False),
    ("hf-bf16", True, [[8, 1, "streamed"]], False),
    ("hf-bf16", False, [[2, 4, "streamed"]], False),
]
# Largest |logit difference| allowed between a mesh and one device. Measured: at most 1.2e-5 on
# logits up to 13 in magnitude (a psum adds the experts' partial sums in another order).
LOGIT_TOLERANCE = 1e-4


@pytest.mark.parametrize("matmul", ["widened", "stored"])
def test_a_residency_budget_and_stored_matmuls_on_a_mesh_match_one_device(tiny_checkpoints, matmul):
    """The same budget keeps the same layers and head on a mesh (each process its devices' share):
    after step 0 they come from memory and only experts and embedding rows are read, byte for byte
    as on one device; tokens are one device's, logits within the mesh tolerance."""
    job = {"job": "settings_on_meshes", "args": {"ckpt": str(tiny_checkpoints["kimi-k2.5"]), "matmul": matmul,
                                                 "meshes": [[1, 8], [2, 4]]}}  # fmt: skip
    (result,) = run_worker([job])
    one = result["one"]
    assert one["from_memory"][0] == 0 and all(m > 0 for m in one["from_memory"][1:])
    for m in result["meshes"]:
        assert m["tokens"] == one["tokens"], m["mesh"]
        assert m["max_abs_logit_diff"] < LOGIT_TOLERANCE, m["mesh"]
        assert (m["used"], m["from_memory"], m["from_storage"]) == (one["used"], one["from_memory"],
                                                                    one["from_storage"]), m["mesh"]


def test_greedy_tokens_on_meshes_match_one_device(tiny_checkpoints):
    jobs = [{"job": "tokens_on_meshes", "args": {"ckpt": str(tiny_checkpoints[layout]), "steps": 16 if kv else 3,
                                                 "kv_cache": kv, "meshes": meshes, "repeat": repeat}}
            for layout, kv, meshes, repeat in MESH_CASES]  # fmt: skip
    for (layout, kv, _, repeat), result in zip(MESH_CASES, run_worker(jobs, workers=2)):
        for m in result["meshes"]:
            where = (layout, "kv" if kv else "no kv", m["mesh"])
            assert m["tokens"] == result["tokens"], where
            assert m["max_abs_logit_diff"] < LOGIT_TOLERANCE, (where, m["max_abs_logit_diff"])
            assert m["layer_bytes_sum"] and all(len(p) == 1 and p[0] == b for p, b in zip(m["bytes_per_process"],
                                                                                           m["from_storage"]))  # fmt: skip
            assert m["bytes"] == m["one_device_bytes"], where  # the bytes used depend only on the routing
            if m["mesh"][2] == "streamed":
                assert m["from_storage"] == m["bytes"], where  # every byte read once, by one process
            else:  # resident: the weights were read before step 0; a step reads only its embedding rows
                assert all(0 < b < one / 10 for b, one in zip(m["from_storage"], m["bytes"])), where
        if repeat:
            assert result["same_mesh_identical"], layout  # same mesh, same platform: bitwise identical
