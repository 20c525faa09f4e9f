"""The command line: synth, inspect, schema, and clean errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import yaml
from click.testing import CliRunner

from kimi_jax.cli import main

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_and_never_overwrites(tmp_path):
    runner = CliRunner()
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        result = runner.invoke(main, ["synth", "--preset", "tiny", "--seed", str(seed), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    again = runner.invoke(main, ["synth", "--out", str(tmp_path / "a")])
    assert again.exit_code != 0 and "already exists" in again.output
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directory left behind"


def test_inspect_json(tiny_checkpoints):
    result = CliRunner().invoke(main, ["inspect", str(tiny_checkpoints["kimi-k2.5"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    cfg = json.loads((tiny_checkpoints["kimi-k2.5"] / "config.json").read_text())["text_config"]
    assert len(report["layers"]) == len(report["bytes_per_layer"]) == cfg["num_hidden_layers"]
    assert report["layout"] == "kimi-k2.5-int4"
    # one token: every non-expert byte, top-k experts per MoE layer, one embedding row, the head
    moe = [l for l in report["layers"] if l["kind"] == "moe"]
    expected = (sum(l["base_bytes"] for l in report["layers"])
                + sum(cfg["num_experts_per_tok"] * l["expert_bytes"] for l in moe)
                + report["embedding_row_bytes"] + report["head_bytes"])  # fmt: skip
    assert report["predicted_bytes_per_token"] == expected
    assert report["embedding_row_bytes"] == cfg["hidden_size"] * 2


def test_inspect_text_and_bad_path(tiny_checkpoints, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["inspect", str(tiny_checkpoints["deepseek-v3"])])
    assert ok.exit_code == 0 and "predicted" in ok.output and "deepseek-v3-fp8" in ok.output
    bad = runner.invoke(main, ["inspect", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_schema_validates_shipped_manifests():
    result = CliRunner().invoke(main, ["schema", "manifest"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    for path in sorted((REPO / "manifests").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    bad = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text()) | {"extra": 1}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("unknown top-level key accepted by the JSON Schema")


def test_run_reports_bad_manifest_before_compute(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\nmodel:\n  synthetic: {preset: tiny}\n  cache_dir: cache\n"
                        "prompt:\n  tokens: [1, 5000]\ngenerate:\n  max_new_tokens: 2\noutput:\n  dir: out\n")  # fmt: skip
    result = CliRunner().invoke(main, ["run", str(manifest)])
    assert result.exit_code == 2, result.output
    assert f"{manifest}:6: prompt.tokens.1: token id 5000 is outside the vocabulary (vocab_size 2048)" in result.output
    assert not (tmp_path / "out").exists()
