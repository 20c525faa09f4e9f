"""Content digests: the digest file, resuming it, checked reads, and a ledger that names the weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import blake3
import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.errors import StorageError
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute
from kimi_jax.storage import digests as digests_mod
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.verify.compare_manifests import compare_manifests
from tests.hostile import sparse_file


def _quiet(*_):
    pass


def _tensors_by_hand(shard: Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute offset, length), read from the safetensors header with json + struct only."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {name: (8 + n + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()}


@pytest.fixture(scope="module")
def digested(tiny_checkpoints, tmp_path_factory):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path_factory.mktemp("digested") / "ckpt")
    result = CliRunner().invoke(main, ["digest", str(ckpt), "--no-progress", "--workers", "3"])
    assert result.exit_code == 0, result.output
    return ckpt


def test_digest_file_holds_blake3_of_every_tensor_and_a_root_over_them(digested):
    data = json.loads((digested / "checkpoint.b3.json").read_text())
    expected: dict[str, dict] = {}
    for shard in sorted(digested.glob("*.safetensors")):
        raw = shard.read_bytes()
        for name, (offset, length) in _tensors_by_hand(shard).items():
            expected[name] = {"shard": shard.name, "offset": offset, "length": length,
                              "digest": blake3.blake3(raw[offset : offset + length]).hexdigest()}  # fmt: skip
    assert data["tensors"] == expected
    (embed,) = data["rows"]
    row_bytes = data["rows"][embed]["row_bytes"]
    first = expected[embed]
    shard = (digested / first["shard"]).read_bytes()
    rows = data["rows"][embed]["digests"]
    assert len(rows) == 64 * first["length"] // row_bytes
    for t in (0, 5, first["length"] // row_bytes - 1):
        start = first["offset"] + t * row_bytes
        assert rows[64 * t : 64 * t + 64] == blake3.blake3(shard[start : start + row_bytes]).hexdigest()
    # the root, as the format documents it: BLAKE3 over sorted NAME\tLENGTH\tDIGEST lines (+ the rows line)
    lines = [f"{n}\t{e['length']}\t{e['digest']}\n" for n, e in expected.items()]
    lines.append(f"{embed}#rows\t{row_bytes}\t{blake3.blake3(bytes.fromhex(rows)).hexdigest()}\n")
    assert data["root"] == blake3.blake3("".join(sorted(lines)).encode()).hexdigest()


def test_digest_resumes_from_its_journal(digested, tmp_path, monkeypatch):
    index = open_checkpoint(digested)
    total = sum(r.nbytes for h in index.shards for r in h.tensors)
    real, calls = digests_mod._hash_tensor, [0]

    def dies_after_ten(*args):
        calls[0] += 1
        if calls[0] > 10:
            raise KeyboardInterrupt("killed")
        return real(*args)

    out = tmp_path / "d.b3.json"
    monkeypatch.setattr(digests_mod, "_hash_tensor", dies_after_ten)
    with pytest.raises(KeyboardInterrupt):
        digests_mod.compute_digests(index, out, workers=1)
    # the journal: one line tying it to this run (shards and journal file), then the ten finished tensors
    assert not out.exists() and len((tmp_path / "d.b3.json.partial").read_text().splitlines()) == 11
    monkeypatch.setattr(digests_mod, "_hash_tensor", real)
    notes = []
    _, table, hashed = digests_mod.compute_digests(index, out, workers=2, on_note=notes.append)
    assert 0 < hashed < total  # the ten journalled tensors were not hashed again
    assert notes == [f"resuming from {tmp_path / 'd.b3.json.partial'}: 10 of {sum(len(h.tensors) for h in index.shards)} tensors were hashed by an earlier run"]
    assert not (tmp_path / "d.b3.json.partial").exists()
    assert json.loads(out.read_text()) == json.loads((digested / "checkpoint.b3.json").read_text())


def test_shared_tensors_get_a_digest_per_segment_of_whole_rows(digested, tmp_path):
    """Each non-expert tensor larger than a segment (here 4 KiB) gets the BLAKE3 of every run of whole
    rows of about that size, so a process reading a share of the rows checks it; the root covers them."""
    index = open_checkpoint(digested)
    out, table, _ = digests_mod.compute_digests(index, tmp_path / "seg.b3.json", workers=2, segments=4096)
    data = json.loads(out.read_text())
    assert data["segment_bytes"] == 4096 and table.segment_bytes == 4096
    shared = {rec.stored_name: rec for rec in digests_mod.shared_tensors(index)}
    big = [rec for rec in shared.values() if rec.nbytes > 4096]
    assert big and set(data["rows"]) == {r.stored_name for r in big} | {index.embed.parts["weight"].stored_name}
    for rec in big:
        seg, row = data["rows"][rec.stored_name], rec.nbytes // rec.shape[0]
        per = max(row, 4096 // row * row)
        assert seg["row_bytes"] == per
        raw = (digested / rec.shard.name).read_bytes()[rec.offset : rec.offset + rec.nbytes]
        by_hand = "".join(blake3.blake3(raw[a : a + per]).hexdigest() for a in range(0, rec.nbytes, per))
        assert seg["digests"] == by_hand, rec.stored_name
    assert table.root != json.loads((digested / "checkpoint.b3.json").read_text())["root"]  # segments are content
    # a file from before segments lacks segment_bytes: several processes cannot check shares with it
    assert digests_mod.unsegmented(table, index) == []
    del data["segment_bytes"]
    old = digests_mod.parse_digest_file(json.dumps(data).encode(), "old")
    assert sorted(digests_mod.unsegmented(old, index)) == sorted(n for n in shared if n not in data["rows"])


def test_a_share_is_widened_to_its_segments_checked_and_the_widening_counted(digested, tmp_path):
    from kimi_jax.storage.reader import ShardReader

    ckpt = shutil.copytree(digested, tmp_path / "ckpt")
    index = open_checkpoint(ckpt)
    _, table, _ = digests_mod.compute_digests(index, tmp_path / "seg.b3.json", workers=2, segments=4096)
    rec = max(digests_mod.shared_tensors(index), key=lambda r: r.nbytes)
    per = table.segment_rows(rec)
    assert 1 < per < rec.shape[0] // 2
    start, stop = per + 1, 2 * per + 1  # straddles segments 1 and 2
    whole = (ckpt / rec.shard.name).read_bytes()[rec.offset : rec.offset + rec.nbytes]
    row = rec.nbytes // rec.shape[0]
    with ShardReader(digests=table) as reader:
        reader.begin_step()
        (share,) = reader.read_shares([(rec, start, stop)], layer=3)
        step = reader.end_step()
    assert share.tobytes() == whole[start * row : stop * row]
    assert step.per_layer[3] == (stop - start) * row  # the share is what was read ...
    assert step.per_layer_overread[3] == (2 * per - (stop - start)) * row  # ... the rest of segments 1-2 discarded
    assert step.digests == {rec.stored_name: table.tensors[rec.stored_name].digest}
    # a changed byte in segment 2, inside the share, is named by its rows; one outside the segments read is not seen
    shard = ckpt / rec.shard.name
    raw = bytearray(shard.read_bytes())
    raw[rec.offset + 2 * per * row + 3] ^= 1
    raw[rec.offset + 5 * per * row + 3] ^= 1 if rec.shape[0] > 5 * per else 0
    shard.write_bytes(bytes(raw))
    with ShardReader(digests=table) as reader, pytest.raises(StorageError) as e:
        reader.read_shares([(rec, start, stop)], layer=3)
    assert f"tensor {rec.stored_name!r}, rows {2 * per}:{3 * per}" in str(e.value) and "differs from" in str(e.value)
    with ShardReader(digests=table) as reader:
        reader.read_shares([(rec, 0, per)], layer=3)  # segment 0 is intact


def _run(tmp_path, ckpt, **storage):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": [7, 300, 7]},
            "generate": {"max_new_tokens": 2}, "storage": storage, "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    return execute(prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml"))), prove=False, echo=_quiet,
                   progress=False)  # fmt: skip


def test_ledger_names_the_weights_each_step_read(digested, tmp_path):
    ledger = _run(tmp_path, digested).ledger
    table = json.loads((digested / "checkpoint.b3.json").read_text())
    assert ledger["ledger_version"] == 2
    assert ledger["checkpoint"]["content_root"] == table["root"]
    assert ledger["checkpoint"]["digest_file"] == str(digested / "checkpoint.b3.json")
    index = open_checkpoint(digested)
    embed = index.embed.parts["weight"]
    for step in ledger["steps"]:
        # the tensors this step must have read, from the ledger's own routing record
        read: dict[str, str] = {}
        # step 0 embeds the prompt; with the KV cache (the default) later steps embed their last token
        for t in set(step["context"] if step["index"] == 0 else step["context"][-1:]):
            read[f"{embed.stored_name}[{t}]"] = table["rows"][embed.stored_name]["digests"][64 * t : 64 * t + 64]
        weights = [w for w in index.head.values()]
        for layer in step["layers"]:
            weights += list(index.layers[layer["layer"]].base.values())
            for e in {e for row in layer.get("experts", []) for e in row}:
                weights += list(index.layers[layer["layer"]].experts[e].values())
        for w in weights:
            for rec in w.parts.values():
                read[rec.stored_name] = table["tensors"][rec.stored_name]["digest"]
        lines = "".join(f"{name}\t{read[name]}\n" for name in sorted(read))
        assert step["weights_digest"] == blake3.blake3(lines.encode()).hexdigest()


def _flip(ckpt: Path, stored_name: str) -> tuple[Path, int]:
    for shard in ckpt.glob("*.safetensors"):
        found = _tensors_by_hand(shard).get(stored_name)
        if found:
            raw = bytearray(shard.read_bytes())
            raw[found[0] + 1] ^= 0x01
            shard.write_bytes(bytes(raw))
            return shard, found[0]
    raise AssertionError(stored_name)


def test_a_changed_byte_stops_the_run_naming_shard_tensor_offset_and_writes_nothing(digested, tmp_path):
    ckpt = shutil.copytree(digested, tmp_path / "ckpt")
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    shard, offset = _flip(ckpt, name)
    with pytest.raises(StorageError) as e:
        _run(tmp_path, ckpt)
    msg = str(e.value)
    assert str(shard) in msg and repr(name) in msg and f"at offset {offset}" in msg and "digest file" in msg
    # nothing written: no bundle, no resume folder (.out.work/identity.json), no lock left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # the named switch turns the check off: the run completes and the ledger says nothing was checked
    ledger = _run(tmp_path, ckpt, verify_digests=False).ledger
    assert ledger["checkpoint"]["content_root"] is None
    assert ledger["checkpoint"]["digest_file"] == str(ckpt / "checkpoint.b3.json")
    assert all(s["weights_digest"] is None for s in ledger["steps"])


def test_compare_tells_same_layout_other_weights_apart_by_content_root(digested, tmp_path):
    other = synth_checkpoint(tmp_path / "seed1", "tiny", "kimi-k2.5", seed=1)

    def manifest(name: str, ckpt: Path) -> Path:
        path = tmp_path / name
        path.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [7]\noutput:\n  dir: out\n")
        return path

    a, b = manifest("a.yaml", digested), manifest("b.yaml", other)
    before = compare_manifests(a, b)  # only one side has a content root: the layouts look the same
    assert before.identical and any("weight bytes were not compared" in n for n in before.notes)
    CliRunner().invoke(main, ["digest", str(other), "--no-progress"])
    after = compare_manifests(a, b)
    assert not after.identical
    assert [d.field for d in after.result_differences] == ["model (checkpoint content_root)"]


# -- the digest file is a stranger's file; the journal is ours only when provably so ---------------


def _manifest_file(tmp_path: Path, ckpt: Path, digest_file: str | None = None) -> Path:
    storage = f"storage:\n  digest_file: {digest_file}\n" if digest_file else ""
    path = tmp_path / "m.yaml"
    path.write_text(f"version: 1\nmodel:\n  checkpoint: {ckpt}\nprompt:\n  tokens: [7]\ngenerate:\n  max_new_tokens: 1\n"
                    f"{storage}output:\n  dir: {tmp_path / 'out'}\n")  # fmt: skip
    return path


def _beside(ckpt: Path, tmp_path: Path, make) -> Path:
    """A checkpoint whose files link to ``ckpt``'s, with ``make(path)`` at checkpoint.b3.json."""
    from tests.hostile import checkpoint_like

    folder = checkpoint_like(ckpt, tmp_path / "ckpt")
    (folder / "checkpoint.b3.json").unlink()
    make(folder / "checkpoint.b3.json")
    return folder


@pytest.mark.parametrize("make, expected", [
    (lambda p: sparse_file(p, 3 << 30), "digest file is 3,221,225,472 bytes, more than the 268,435,456"),
    (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "digest file: JSON nested too deeply"),
    (lambda p: p.write_text('{"format": "kimi-jax-tensor-digests", "version": 1, "algorithm": "blake3", "root": 1, '
                            '"tensors": {"x": {"shard": "s", "offset": ' + "9" * 5000 + "}}}"),
     "digest file: not valid JSON (Exceeds the limit (4300 digits)"),
    (lambda p: p.write_text('{"format": "kimi-jax-tensor-digests", "version": 1, "algorithm": "blake3", "root": 1, '
                            '"tensors": {"x": {"shard": "s", "offset": -5, "length": 1, "digest": "0"}}, "rows": {}}'),
     "tensors['x'].offset: expected a non-negative integer, got '-5'"),
    (lambda p: os.mkfifo(p), "checkpoint.b3.json: digest file is a FIFO; expected a regular file"),
    (lambda p: p.mkdir(), "checkpoint.b3.json: digest file is a folder; expected a regular file"),
])  # fmt: skip
def test_a_digest_file_beside_the_checkpoint_is_read_through_bounds(digested, tmp_path, make, expected):
    """Main read it whole (a 3 GiB file: 6.3 GiB, 25 s), let deep JSON or a 5,000-digit number end in
    an internal error, ignored a FIFO, and blamed storage.digest_file, which the manifest never set."""
    ckpt = _beside(digested, tmp_path, make)
    result = CliRunner().invoke(main, ["run", str(_manifest_file(tmp_path, ckpt)), "-q"])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "model.checkpoint: " in result.output and "storage.digest_file" not in result.output
    assert "internal error" not in result.output


@pytest.mark.parametrize("named, expected", [
    ("/dev/zero", "/dev/zero: digest file is a character device; expected a regular file"),
    ("FOLDER", "digest file is a folder; expected a regular file"),
    ("MISSING", "the digest file named in the manifest does not exist"),
])  # fmt: skip
def test_a_named_digest_file_that_is_not_a_file_says_what_it_is(digested, tmp_path, named, expected):
    """Main said 'does not exist' of a FIFO, /dev/zero or a folder."""
    (tmp_path / "FOLDER").mkdir()
    path = named if named.startswith("/") else str(tmp_path / named)
    result = CliRunner().invoke(main, ["run", str(_manifest_file(tmp_path, digested, path)), "-q"])
    assert result.exit_code == 2 and "storage.digest_file: " in result.output and expected in result.output, \
        result.output  # fmt: skip


def test_digest_does_not_trust_a_journal_it_did_not_write(digested, tmp_path):
    """Main resumed from a shipped checkpoint.b3.json.partial and printed its forged root, exit 0."""
    ckpt = Path(shutil.copytree(digested, tmp_path / "ckpt"))
    (ckpt / "checkpoint.b3.json").unlink()
    genuine = json.loads((digested / "checkpoint.b3.json").read_text())
    forged = [json.dumps({"name": n, **{**e, "digest": "0" * 64}}) for n, e in genuine["tensors"].items()]
    (ckpt / "checkpoint.b3.json.partial").write_text("\n".join(forged) + "\n")
    result = CliRunner().invoke(main, ["digest", str(ckpt), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "checkpoint.b3.json.partial: not resumed: it was not written by `kimi-jax digest` of these files on " \
           "this machine" in result.output  # fmt: skip
    assert f"content root {genuine['root']}" in result.output
    assert json.loads((ckpt / "checkpoint.b3.json").read_text()) == genuine


def test_a_journal_line_with_missing_fields_is_skipped_and_rehashed(digested, tmp_path, monkeypatch):
    """Main stopped with an internal error (KeyError) on such a line of its own journal."""
    index = open_checkpoint(digested)
    real, calls = digests_mod._hash_tensor, [0]

    def dies_after_three(*args):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt("killed")
        return real(*args)

    out = tmp_path / "d.b3.json"
    monkeypatch.setattr(digests_mod, "_hash_tensor", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        digests_mod.compute_digests(index, out, workers=1)
    journal = tmp_path / "d.b3.json.partial"
    header, first, *rest = journal.read_text().splitlines()
    broken = json.loads(first)
    del broken["shard"], broken["offset"]
    journal.write_text("\n".join([header, json.dumps(broken), *rest]) + "\n")
    monkeypatch.setattr(digests_mod, "_hash_tensor", real)
    notes = []
    _, table, _ = digests_mod.compute_digests(index, out, workers=2, on_note=notes.append)
    assert notes and "2 of" in notes[0]  # the two intact entries resumed, the broken one hashed again
    assert table.root == json.loads((digested / "checkpoint.b3.json").read_text())["root"]


@pytest.mark.parametrize("failure, expected", [
    (errno.EROFS, "read-only file system [EROFS]"), (errno.ENOSPC, "no space left on device [ENOSPC]")])
def test_digest_onto_a_read_only_or_full_disk_is_named(digested, tmp_path, monkeypatch, failure, expected):
    """Main ended in an internal error."""
    def refuse(path, *args, **kwargs):
        raise OSError(failure, os.strerror(failure), str(path))

    monkeypatch.setattr(digests_mod, "write_json_atomic", refuse)
    result = CliRunner().invoke(main, ["digest", str(digested), "--no-progress", "--out", str(tmp_path / "d.json")])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "the tensors hashed so far are kept in d.json.partial" in result.output
    monkeypatch.setattr(digests_mod, "open", refuse, raising=False)
    result = CliRunner().invoke(main, ["digest", str(digested), "--no-progress", "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 2 and expected in result.output, result.output
