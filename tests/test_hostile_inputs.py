"""Hostile inputs end in one named error each, never a traceback, a hang or unbounded memory.

The corpus (tests/hostile.py) is generated here and run through the CLI in a child process whose
address space is limited to what it had after warming up plus MEMORY_BOUND (RLIMIT_AS): an
archive expanding to 1.5 GiB, an orbax tree declaring 2**28 logits, a pax header of 1.5 GiB, a
config asking for 10**9 layers, a 3 GiB digest file, chat templates asking for 10**10 characters
and tokenizer files that make the tokenizers library abort must all be refused within it. Each
case must also end within CASE_SECONDS, and its output stay under OUTPUT_CHARS (error lines
quote strangers' files, capped). Templates and tokenizer.json run in the worker process, which
has its own limits (kimi_jax/text/worker.py: 1 GiB beyond its start, 10 s per rendering).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_jax.errors import CheckpointError
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.safetensors_header import read_shard_header
from tests.hostile import SHARD, all_cases, checkpoint_like, read_header, write_shard_raw

REPO = Path(__file__).resolve().parents[1]
# The stated bound: hostile input may make a command use at most this much address space beyond
# the warmed-up process (the largest legitimate input, a 256 MiB ledger.json, needs about 1.5 GiB).
MEMORY_BOUND = 2 << 30
CASE_SECONDS = 60  # the slowest legitimate limit inside is the worker's 30 s to parse a tokenizer.json
OUTPUT_CHARS = 20_000  # verify's eleven lines, each capped


def test_hostile_corpus_ends_in_named_errors_within_the_memory_bound(tiny_checkpoints, small_bundle, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    cases = all_cases(ckpt, small_bundle, tmp_path / "corpus")
    spec = {"warmup": [["verify", str(small_bundle)], ["inspect", str(ckpt)]], "bound_bytes": MEMORY_BOUND,
            "cases": [{"name": c.name, "argv": list(c.argv)} for c in cases]}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TMPDIR": str(tmp_path / "child-tmp")}
    (tmp_path / "child-tmp").mkdir()
    child = subprocess.run([sys.executable, "-m", "tests.bounded_child", str(tmp_path / "spec.json"),
                            str(tmp_path / "results.json")], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    problems = []
    for case, result in zip(cases, results["results"], strict=True):
        out = result["output"]
        if result["exit_code"] not in case.exit_codes or case.expect not in out or "internal error" in out \
                or "Traceback" in out:  # fmt: skip
            problems.append(f"{case.name}: exit {result['exit_code']}, expected {case.exit_codes} and "
                            f"{case.expect!r}; got: {out[-600:]}")  # fmt: skip
    assert not problems, "\n\n".join(problems)
    peak = max(r["vm_peak"] for r in results["results"])
    assert peak <= results["limit"]
    slow = [f"{r['name']}: {r['seconds']} s" for r in results["results"] if r["seconds"] > CASE_SECONDS]
    assert not slow, slow
    long = [f"{r['name']}: {r['output_chars']:,} characters" for r in results["results"]
            if r["output_chars"] > OUTPUT_CHARS]  # fmt: skip
    assert not long, long
    assert not list((tmp_path / "child-tmp").iterdir()), "a command left temporary files behind"
    assert len(cases) >= 70


# -- classes worth a closer look ----------------------------------------------------------------


def test_safetensors_offsets_must_tile_the_data_section(tiny_checkpoints, tmp_path):
    shard = tmp_path / SHARD
    header, body = read_header(tiny_checkpoints["kimi-k2.5"] / SHARD)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first = names[0]
    begin, end = header[first]["data_offsets"]
    header[first]["data_offsets"] = [begin - 4096, end - 4096]
    write_shard_raw(shard, header, body)
    with pytest.raises(CheckpointError) as e:
        read_shard_header(shard)
    message = str(e.value)  # the old message said "span 4096 bytes, but ... needs 4096"
    assert f"tensor {first!r}: corrupted data_offsets [{begin - 4096}, {end - 4096}]; expected 0 <= begin <= end" \
        in message and "span" not in message  # fmt: skip

    header, body = read_header(tiny_checkpoints["kimi-k2.5"] / SHARD)
    header["duplicate"] = header[names[0]]
    shard.write_bytes(b"")
    write_shard_raw(shard, header, body)
    with pytest.raises(CheckpointError, match=r"data_offsets \[0, \d+\] overlap tensor .*; tensors may not share bytes"):
        read_shard_header(shard)

    header, body = read_header(tiny_checkpoints["kimi-k2.5"] / SHARD)
    write_shard_raw(shard, header, body)
    parsed = read_shard_header(shard)  # untouched, it parses, and its tensors tile the data exactly
    spans = sorted((r.offset, r.offset + r.nbytes) for r in parsed.tensors)
    assert spans[0][0] == parsed.data_start and spans[-1][1] == parsed.file_size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_symlinked_shards_are_followed_only_to_regular_files_and_folders_stay_inside(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    linked = checkpoint_like(ckpt, tmp_path / "linked")  # every file a link into another folder, as in HF caches
    assert open_checkpoint(linked).layout == "kimi-k2.5-int4"

    escaping = checkpoint_like(ckpt, tmp_path / "escaping")
    (escaping / "sub").symlink_to(ckpt)  # a folder link leading out of the checkpoint
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.lm_head.weight"] = "sub/model-00005-of-000007.safetensors"
    (escaping / "model.safetensors.index.json").unlink()
    (escaping / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="whose folder resolves to .*, outside the checkpoint folder"):
        open_checkpoint(escaping)
