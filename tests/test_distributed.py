"""Two processes on localhost over jax.distributed (CPU, gloo): an anchor frozen on the mesh, per-process
bytes, one bundle that verifies, a killed process named by the survivor within the timeout, and
--resume on the mesh.

Every process is a real ``kimi-jax run`` with one CPU device; the expected byte shares are derived
here from the checkpoint index and the routing in the ledger, following the rule the placement
documents: rows of each stored tensor in one block per device, distinct experts (by id) dealt
round-robin to the devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimi_jax.model.engine import Engine
from kimi_jax.storage.checkpoint import open_checkpoint

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20  # distributed.timeout_s of these runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(manifest: Path, out: Path | None, processes: int, *args: str, env_of=lambda pid: {}, wait_s: float = 600,
           command: tuple[str, ...] = ("run",)):  # fmt: skip
    """Start ``processes`` ``kimi-jax run`` (or ``command``) processes; (returncode, stderr, stdout, seconds) of each."""
    port = free_port()
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                JAX_PLATFORMS="cpu", KIMI_JAX_COORDINATOR=f"127.0.0.1:{port}", KIMI_JAX_NUM_PROCESSES=str(processes))  # fmt: skip
    base.pop("XLA_FLAGS", None)
    started = time.monotonic()
    where = ["--out", str(out)] if out is not None else []
    procs = [subprocess.Popen([sys.executable, "-m", "kimi_jax.cli", *command, str(manifest), *where, *args],
                              env={**base, "KIMI_JAX_PROCESS_ID": str(pid), **env_of(pid)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in range(processes)]  # fmt: skip
    ended: dict[int, float] = {}
    while len(ended) < processes and time.monotonic() - started < wait_s:
        for pid, proc in enumerate(procs):
            if pid not in ended and proc.poll() is not None:
                ended[pid] = time.monotonic() - started
        time.sleep(0.2)
    results = []
    for pid, proc in enumerate(procs):
        out, err = proc.communicate(timeout=max(1.0, wait_s - (time.monotonic() - started)))
        results.append((proc.returncode, err, out, ended.get(pid, time.monotonic() - started)))
    return results


@pytest.fixture(scope="module")
def digested(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny checkpoint with a digest file of 4 KiB segments: each process checks its shares."""
    import shutil

    from click.testing import CliRunner

    from kimi_jax.cli import main

    path = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path_factory.mktemp("digested") / "ckpt")
    assert CliRunner().invoke(main, ["digest", str(path), "--no-progress", "--segment-bytes", "4096"]).exit_code == 0
    return path


@pytest.fixture(scope="module")
def manifest(digested, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "m.yaml"
    path.write_text(f"version: 1\nmodel:\n  checkpoint: {digested}\nprompt:\n  tokens: [5, 9, 400]\n"
                    "generate: {max_new_tokens: 3, kv_cache: true}\nstorage: {resident_bytes: 0}\ncompute:\n  mesh: {expert: 2, model: 1}\n"
                    f"distributed: {{timeout_s: {TIMEOUT_S}}}\nanchor: anchor.json\noutput:\n  dir: out\n")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def whole_run(manifest) -> Path:
    # the anchor: step 0 run twice on the two-process mesh must agree bit for bit; process 0 writes it
    for code, err, _, _ in launch(manifest, None, 2, command=("anchor", "freeze")):
        assert code == 0, err[-3000:]
    out = manifest.parent / "whole"
    launched = launch(manifest, out, 2)
    for code, err, _, _ in launched:
        assert code == 0, err[-3000:]
    (out.parent / "whole-output.json").write_text(json.dumps([[err, text] for _, err, text, _ in launched]))
    return out


def shares(index, ledger: dict) -> dict[tuple[int, int | None], list[int]]:
    """Bytes each of 2 processes (one device each) should read, per (step, layer), from the rule above."""
    def rows_split(rec) -> list[int]:
        block = -(-rec.shape[0] // 2)
        row = rec.nbytes // rec.shape[0]
        return [row * max(0, min(rec.shape[0], (p + 1) * block) - p * block) for p in range(2)]

    want = {}
    for step in ledger["steps"]:
        for layer in step["layers"]:
            lm = index.layers[layer["layer"]]
            got = [0, 0]
            for entry in lm.base.values():
                for part, rec in entry.parts.items():
                    split = [rec.nbytes, 0] if part == "weight_shape" else rows_split(rec)
                    got = [a + b for a, b in zip(got, split)]
            for j, expert in enumerate(sorted({e for row in layer.get("experts") or [] for e in row})):
                got[j % 2] += lm.expert_bytes(expert)
            want[(step["index"], layer["layer"])] = got
    return want


def test_two_processes_read_their_shares_and_total_the_one_device_run(whole_run, digested):
    """Each process reads its shares, checked segment by segment against the digest file; the
    ledger's weights digests name what one device's run names."""
    from kimi_jax.storage.digests import DIGEST_FILE, load_digest_file
    from kimi_jax.storage.reader import ShardReader

    ledger = json.loads((whole_run / "ledger.json").read_text())
    index = open_checkpoint(digested)
    with Engine(index, reader=ShardReader(digests=load_digest_file(digested / DIGEST_FILE))) as engine:
        one = engine.generate([5, 9, 400], 3, kv_cache=True)
    assert [s["token"] for s in ledger["steps"]] == [s.token for s in one]
    assert [s["bytes_read"] for s in ledger["steps"]] == [s.bytes_read for s in one]  # every byte read once
    assert ledger["checkpoint"]["content_root"] == json.loads((digested / DIGEST_FILE).read_text())["root"]
    assert [s["weights_digest"] for s in ledger["steps"]] == [s.storage["weights_digest"] for s in one]
    assert all(s["weights_digest"] for s in ledger["steps"])
    assert ledger["run"]["mesh"]["process_count"] == 2 and ledger["platform"]["process_count"] == 2
    assert ledger["anchor"]["status"] == "matched"
    anchor = json.loads((whole_run.parent / "anchor.json").read_text())
    assert anchor["mesh"] == "2x1 streamed" and anchor["platform"]["process_count"] == 2
    for (step, layer), want in shares(index, ledger).items():
        assert ledger["steps"][step]["layers"][layer]["bytes_per_process"] == want, (step, layer)
    per_step = [s["bytes_per_process"] for s in ledger["steps"]]
    assert all(min(p) > 0.3 * sum(p) for p in per_step), per_step  # each process did its part of the reading
    verify = subprocess.run([sys.executable, "-m", "kimi_jax.cli", "verify", str(whole_run)], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    assert verify.returncode == 0 and "VERIFIED" in verify.stdout, verify.stdout[-3000:]


def test_gloo_notices_stay_out_of_the_output(whole_run):
    # jaxlib's gloo prints "[Gloo] Rank N is connected to ..." to stdout, into the generated text
    (err0, text0), (err1, text1) = json.loads((whole_run.parent / "whole-output.json").read_text())
    assert "[Gloo]" not in err0 + text0 + err1 + text1
    assert text0.endswith("\n") and text1 == ""  # process 0 streams the text, the other nothing


@pytest.mark.parametrize("chunks, passed", [
    ([b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n", b"5 9 "],
     b"5 9 "),
    ([b"text", b"[Gloo] not at a line start\n"], b"text[Gloo] not at a line start\n"),
    ([b"a\n[G", b"lo", b"o] Rank 1 is connected\n", b"[Glob]\n", b"["], b"a\n[Glob]\n["),
    ([b"[Gloo] cut short"], b""),
])  # fmt: skip
def test_the_stdout_filter_drops_whole_gloo_lines_only(chunks, passed):
    from kimi_jax.run.gloo_lines import GlooLineFilter

    lines = GlooLineFilter()
    assert b"".join(lines.feed(c) for c in chunks) + lines.close() == passed


def test_a_killed_process_is_named_by_the_other_and_the_run_resumes(manifest, whole_run):
    out = manifest.parent / "killed"
    # process 1 dies inside layer 1 of step 1 of the instrumented run (SIGKILL: no goodbye)
    results = launch(manifest, out, 2, env_of=lambda pid: {"KIMI_JAX_FAULT": "instrumented:1:1"} if pid == 1 else {})
    (code0, err0, _, _), (code1, _, _, died) = results
    assert code1 == -9
    assert code0 == 3 and "error: PeerProcessLost: process 0 of 2" in err0, err0[-3000:]
    assert results[0][3] - died < TIMEOUT_S + 30  # named within the timeout (slack for a loaded machine), not a hang
    assert not (out / "ledger.json").exists()
    for code, err, _, _ in launch(manifest, out, 2, "--resume"):
        assert code == 0, err[-3000:]
    resumed, whole = (json.loads((d / "ledger.json").read_text())["steps"] for d in (out, whole_run))
    fields = ("token", "hidden_digest", "logits_digest", "bytes_read", "bytes_per_process")
    assert [[s[f] for f in fields] for s in resumed] == [[s[f] for f in fields] for s in whole]


def test_a_killed_process_0_is_named_by_the_survivor(manifest, whole_run, tmp_path):
    """Process 0 hosts the coordination service: on main its death made jaxlib abort the survivor
    (a fatal log and SIGABRT, exit -6) instead of exit 3 and PeerProcessLost."""
    (tmp_path / "tmp").mkdir()
    where = {"TMPDIR": str(tmp_path / "tmp")}  # where the survivor saves jaxlib's log of the abort
    results = launch(manifest, tmp_path / "killed0", 2,
                     env_of=lambda pid: {"KIMI_JAX_FAULT": "bare:0:0", **where} if pid == 0 else where)  # fmt: skip
    (code0, _, _, died), (code1, err1, _, ended) = results
    assert code0 == -9
    assert code1 == 3 and "error: PeerProcessLost: process 1 of 2" in err1, err1[-3000:]
    assert "Check failure" not in err1 and "terminate called" not in err1, err1[-3000:]
    assert ended - died < TIMEOUT_S + 30
    if "coordination service of process 0" in err1:  # (else the collective noticed first: gloo's error line)
        (saved,) = (tmp_path / "tmp").glob("kimi-jax-peer-lost-*.txt")
        assert str(saved) in err1 and "coordination service" in saved.read_text()


def test_a_changed_byte_in_one_process_share_stops_the_run_naming_the_rows(digested, tmp_path):
    """Process 1 reads the second half of o_proj's rows: a flipped byte there is caught by its segment
    check, named by tensor and rows, before anything is written; process 0 names the lost peer."""
    import shutil

    ckpt = Path(shutil.copytree(digested, tmp_path / "ckpt"))
    index = open_checkpoint(ckpt)
    rec = index.layers[1].base["layers.1.self_attn.o_proj.weight"].parts["weight"]
    row = rec.nbytes // rec.shape[0]
    target = rec.shape[0] - 1  # the last row: process 1's share
    shard = ckpt / rec.shard.name
    raw = bytearray(shard.read_bytes())
    raw[rec.offset + target * row] ^= 0x10
    shard.write_bytes(bytes(raw))
    path = tmp_path / "m.yaml"
    path.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [5, 9, 400]\n"
                    "generate: {max_new_tokens: 1}\ncompute:\n  mesh: {expert: 2, model: 1}\n"
                    f"distributed: {{timeout_s: {TIMEOUT_S}}}\noutput:\n  dir: out\n")  # fmt: skip
    (code0, err0, _, _), (code1, err1, _, _) = launch(path, tmp_path / "out", 2)
    assert code1 != 0 and f"tensor {rec.stored_name!r}, rows " in err1 and "differs from" in err1, err1[-3000:]
    assert code0 != 0, err0[-3000:]
    assert "Traceback" not in err1 and not (tmp_path / "out").exists()


def test_a_process_whose_peers_never_come_fails_with_a_named_error(manifest, tmp_path):
    (code, err, _, seconds), = launch(manifest, tmp_path / "alone", 1, env_of=lambda pid: {"KIMI_JAX_NUM_PROCESSES": "2"},
                                   wait_s=TIMEOUT_S + 60)  # fmt: skip
    assert code == 3 and "error: DistributedError: process 0 of 2 could not join the others" in err, err[-3000:]
    assert seconds < TIMEOUT_S + 30
