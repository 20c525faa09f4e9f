"""Fault injection: the reader survives EIO and short reads; the bundle writer loses nothing when
the disk fills at any of its writes or the process is killed at any point of the swap, and the
recovery afterwards touches only what the killed run provably left."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_jax.errors import OutputError, StorageError
from kimi_jax.ledger import bundle as bundle_mod
from kimi_jax.ledger.bundle import RECEIPT, recover_interrupted_swap, write_bundle
from kimi_jax.run.output import hold_output
from kimi_jax.run.plan import load_plan
from kimi_jax.run.resume import RunCheckpoints
from kimi_jax.run.runner import execute
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ShardReader
from kimi_jax.verify.checklist import verify_bundle

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


# -- the reader ------------------------------------------------------------------------------------


def _records(ckpt):
    idx = open_checkpoint(ckpt)
    return [p for w in list(idx.weights.values())[:12] for p in w.parts.values()]


def test_transient_eio_and_short_reads_give_the_same_bytes(tiny_checkpoints, monkeypatch):
    records = _records(tiny_checkpoints["kimi-k2.5"])
    with ShardReader() as reader:
        want = [a.copy() for a in reader.read_records(records, layer=None)]
    real = ShardReader._pread
    calls = {"n": 0}

    def flaky(self, fd, view, offset):
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, fd, view[: max(1, len(view) // 3)], offset)  # never more than a third at once

    monkeypatch.setattr(ShardReader, "_pread", flaky)
    with ShardReader(retries=3, backoff_s=0.0) as reader:
        got = reader.read_records(records, layer=None)
        assert reader.run.total == sum(r.nbytes for r in records)
    assert all((a == b).all() for a, b in zip(got, want))


def test_persistent_eio_is_named_and_a_vanished_shard_is_not_read(tiny_checkpoints, tmp_path, monkeypatch):
    ckpt = Path(shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt"))
    records = _records(ckpt)

    def broken(self, fd, view, offset):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(ShardReader, "_pread", broken)
        with ShardReader(retries=1, backoff_s=0.0) as reader, pytest.raises(StorageError, match="failed after 2"):
            reader.read_records(records[:1], layer=None)
    shard = records[0].shard
    shard.unlink()
    os.mkfifo(shard)  # swapped for a FIFO after indexing: refused, not waited on
    with ShardReader() as reader, pytest.raises(StorageError, match="shard is a FIFO; expected a regular file"):
        reader.read_records(records[:1], layer=None)


# -- the bundle writer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcome(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "m.yaml").write_text(f"version: 1\nmodel: {{checkpoint: {tiny_checkpoints['kimi-k2.5']}}}\n"
                                "prompt: {tokens: [9]}\ngenerate: {max_new_tokens: 2}\noutput: {dir: fresh}\n")  # fmt: skip
    plan = load_plan(str(tmp / "m.yaml"))
    return plan.manifest, execute(plan, prove=True, echo=lambda *_: None, progress=False)


WRITERS = ("write_json_atomic", "write_bytes_atomic", "save_arrays", "write_checksums")


def _inject(monkeypatch, fail_at: int | None, error) -> list[str]:
    """Count every write the bundle writer makes; the ``fail_at``-th raises ``error``."""
    done: list[str] = []

    def wrap(name, real):
        def write(*args, **kwargs):
            done.append(name)
            if len(done) - 1 == fail_at:
                raise error
            return real(*args, **kwargs)

        return write

    for name in WRITERS:
        monkeypatch.setattr(bundle_mod, name, wrap(name, getattr(bundle_mod, name)))
    monkeypatch.setattr(bundle_mod.shutil, "copyfile", wrap("copyfile", shutil.copyfile))
    return done


def test_a_full_disk_at_any_write_keeps_the_old_bundle_and_removes_the_partial(outcome, small_bundle, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    manifest, result = outcome
    with monkeypatch.context() as m:
        writes = _inject(m, None, None)
        write_bundle(tmp_path / "count", manifest, result.ledger, result.steps, None, "<html></html>")
    assert len(writes) >= 8 and set(writes) >= {*WRITERS, "copyfile"}

    old = _tree(small_bundle)
    full = OSError(errno.ENOSPC, "No space left on device")
    orbax_full = ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']")
    for k, kind in enumerate(writes):
        out = Path(shutil.copytree(small_bundle, tmp_path / f"out-{k}"))
        with monkeypatch.context() as m:
            _inject(m, k, orbax_full if kind == "save_arrays" else full)
            with pytest.raises(OutputError, match=r"cannot write the bundle: no space left on device.*the partial "
                                                  r"bundle was removed"):  # fmt: skip
                write_bundle(out, manifest, result.ledger, result.steps, None, "<html></html>")
        assert _tree(out) == old, f"write {k} ({kind}): the previous bundle changed"
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
        assert not left, f"write {k} ({kind}): the partial bundle was left behind"
    out = write_bundle(tmp_path / f"out-{len(writes) - 1}", manifest, result.ledger, result.steps, None, None)
    assert verify_bundle(out).ok


def test_a_full_disk_while_saving_a_step_keeps_the_saved_steps(outcome, tmp_path, monkeypatch):
    _, result = outcome
    checkpoints = RunCheckpoints(tmp_path / "out", {"x": 1}, resume=False)
    checkpoints.save("instrumented", result.steps[0])
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kimi_jax.run.resume.write_bytes_atomic", full)
    with pytest.raises(OutputError, match=r"cannot save step 1 of the instrumented run: no space left on device.*--resume"):
        checkpoints.save("instrumented", result.steps[1])
    assert len(RunCheckpoints(tmp_path / "out", {"x": 1}, resume=True).load("instrumented")[0]) == 1


_KILLER = """
import os, signal, sys
from pathlib import Path
from kimi_jax.ledger import bundle, swap
from kimi_jax.run.output import hold_output
new, out, when = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
real, calls = os.rename, []
def rename(a, b):
    calls.append((a, b))
    if len(calls) == when:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
swap.os.rename = rename
if when == 3:  # after both renames, while the old bundle is being removed
    real_unlink = os.unlink
    def unlink(path, *a, **k):
        real_unlink(path, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    swap.os.unlink = unlink
with hold_output(out):
    token = swap.current_token(out)
    work = swap.partial_dir(out, token)
    real(new, work)
    swap.mark(work, token)
    bundle.swap_into_place(work, out, token)
"""


@pytest.mark.parametrize("when", [1, 2, 3], ids=["before-the-renames", "between-the-renames", "removing-the-old"])
def test_kill_during_the_swap_loses_nothing(small_bundle, tmp_path, when):
    out = Path(shutil.copytree(small_bundle, tmp_path / "out"))
    new = Path(shutil.copytree(small_bundle, tmp_path / "new"))
    receipt = json.loads((new / RECEIPT).read_text())
    receipt["created"] = "the new bundle"  # the receipt is not in CHECKSUMS.b3: still a valid bundle
    (new / RECEIPT).write_text(json.dumps(receipt))
    old_tree, new_tree = _tree(out), _tree(new)
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(new), str(out), str(when)], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert ".out.lock" in left and len(left) > 2, left  # the killed run's lock record and what it left

    with hold_output(out):  # as the next run does: it reads the killed run's record, then recovers
        notes = recover_interrupted_swap(out)
    assert _tree(out) == (old_tree if when < 3 else new_tree)  # one complete bundle, never a mixture
    assert verify_bundle(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "nothing .out.* left behind"
    assert notes and {1: "removed the marker", 2: "restored", 3: "removed"}[when] in " ".join(notes)


def test_recovery_never_touches_folders_it_cannot_prove_are_a_killed_runs(small_bundle, tmp_path):
    """Main's recovery deleted a user's '.out.old-mybackup' and renamed a '.out.partial' to 'out'."""
    out = tmp_path / "out"
    mine = {name: Path(shutil.copytree(small_bundle, tmp_path / name))
            for name in (".out.old-mybackup", ".out.partial", ".out.old-0123456789abcdef")}  # fmt: skip
    (mine[".out.partial"] / "thesis.tex").write_text("years of work")
    trees = {name: _tree(path) for name, path in mine.items()}
    # a marker with a token no lock recorded proves nothing either
    (mine[".out.old-0123456789abcdef"] / ".kimi-jax-owner").write_text("0123456789abcdef")
    with hold_output(out):
        notes = recover_interrupted_swap(out)
    assert not out.exists()
    assert {name: _tree(path) for name, path in mine.items() if name != ".out.old-0123456789abcdef"} == \
        {name: t for name, t in trees.items() if name != ".out.old-0123456789abcdef"}  # fmt: skip
    assert (mine[".out.old-0123456789abcdef"] / ".kimi-jax-owner").exists()
    assert sum("left" in n and "alone" in n for n in notes) == 3, notes


def test_nan_weights_stop_the_run_at_the_first_step_naming_the_layer(tiny_checkpoints, tmp_path):
    """Main computed every step with NaN weights, then failed writing them: an internal error."""
    from click.testing import CliRunner

    from kimi_jax.cli import main

    ckpt = Path(shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt"))
    rec = open_checkpoint(ckpt).layers[1].base["layers.1.self_attn.o_proj.weight"].parts["weight"]
    assert rec.dtype == "BF16"
    with open(rec.shard, "r+b") as f:
        f.seek(rec.offset)
        f.write(b"\xc0\x7f" * (rec.nbytes // 2))  # bfloat16 NaN
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [7, 300]\n"
                        f"generate:\n  max_new_tokens: 3\noutput:\n  dir: {tmp_path / 'out'}\n")  # fmt: skip
    result = CliRunner().invoke(main, ["run", str(manifest), "--no-prove", "-q"])
    assert result.exit_code == 2 and "internal error" not in result.output, result.output
    assert "error: step 0 of the instrumented run: layer 1's output is not finite (its norm is nan)" in result.output
    result = CliRunner().invoke(main, ["run", str(manifest), "-q"])  # proving: the bare run comes first
    assert result.exit_code == 2 and "step 0 of the bare run: the hidden state after the last layer is not finite" \
        in result.output, result.output  # fmt: skip
    assert not (tmp_path / "out").exists()
