"""Every manifest in manifests/ runs as its comments and the README say, through the CLI.

* synthetic ones run as shipped (the vindex one through ``kimi-jax vindex``);
* real-checkpoint ones run against a synthetic checkpoint of the same layout written with
  ``kimi-jax synth``, through ``--set model.checkpoint=...``, the way a user points them at a copy.
  The one change: a token-id prompt names the real vocabulary's [BOS] (163584), which the tiny
  preset's 2,048 ids do not hold, so it becomes the tiny vocabulary's [BOS] (vocab_size - 256, as in
  Kimi). Text and chat prompts run unchanged;
* the full-shape preset (a sparse 595 GB layout) is generated and planned (every tensor's shape
  checked against its config) but not run: one token reads 33 GB of file holes and took minutes
  (README, The memory model).

Every bundle written must pass ``kimi-jax verify``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.manifest import load_manifest
from kimi_jax.run.plan import prepare_run

from .test_readme import demo_log_bytes

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
SHIPPED = sorted(p.name for p in MANIFESTS.glob("*.y*ml"))

SYNTHETIC_RUNS = ["demo.yaml", "chat-demo.yaml", "prompts-demo.yaml"]
REAL_CHECKPOINT = ["kimi-k2.5.yaml", "kimi-k2.5-chat.yaml", "kimi-k2.5-hub.yaml"]
VINDEX = ["vindex-demo.yaml"]
PLANNED_ONLY = ["full-shape.yaml"]
TINY_BOS = 2048 - 256


def test_every_shipped_manifest_is_exercised_here():
    assert sorted(SYNTHETIC_RUNS + REAL_CHECKPOINT + VINDEX + PLANNED_ONLY) == SHIPPED


def _invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (args, result.output[-3000:])
    return result


def _verified(bundle: Path) -> None:
    report = _invoke("verify", str(bundle))
    assert "VERIFIED" in report.stdout.splitlines()[-1], report.stdout


@pytest.mark.parametrize("name", SYNTHETIC_RUNS)
def test_synthetic_manifests_run_as_shipped(name, tmp_path):
    result = _invoke("run", str(MANIFESTS / name), "--out", str(tmp_path / "bundle"))
    _verified(tmp_path / "bundle")
    assert "\r" not in result.stderr
    if name == "demo.yaml":  # the README quotes the size of its log (paths here are longer than in a user's)
        cached, cold = min(demo_log_bytes()), max(demo_log_bytes())
        assert 0.8 * cached <= len(result.stderr.encode()) <= cold + 400, len(result.stderr.encode())


@pytest.fixture(scope="module")
def k25_copy(tmp_path_factory) -> Path:
    """What a user with the real checkpoint has, in miniature: the K2.5 layout, written by synth."""
    out = tmp_path_factory.mktemp("k25") / "Kimi-K2.5"
    _invoke("synth", "--preset", "tiny", "--layout", "kimi-k2.5", "--seed", "0", "--out", str(out))
    return out


@pytest.mark.parametrize("name", REAL_CHECKPOINT)
def test_real_checkpoint_manifests_run_pointed_at_a_copy(name, k25_copy, tmp_path):
    shipped = yaml.safe_load((MANIFESTS / name).read_text())
    assert shipped.get("anchor") is None, "an anchor is frozen on the user's machine; none can ship"
    args = ["--set", f"model.checkpoint={k25_copy}"]
    if shipped["prompt"].get("tokens") == [163584]:
        args += ["--set", f"prompt.tokens=[{TINY_BOS}]"]  # the real vocabulary's [BOS], see the module doc
    _invoke("run", str(MANIFESTS / name), *args, "--out", str(tmp_path / "bundle"))
    _verified(tmp_path / "bundle")


def test_the_documented_anchor_commands_freeze_and_hold_the_real_manifest(k25_copy, tmp_path):
    """manifests/kimi-k2.5.yaml's comment: freeze once with --set anchor=FILE, then run with it."""
    manifest = str(MANIFESTS / "kimi-k2.5.yaml")
    args = ["--set", f"model.checkpoint={k25_copy}", "--set", f"prompt.tokens=[{TINY_BOS}]", "--set",
            "generate.max_new_tokens=2", "--set", f"anchor={tmp_path / 'anchors' / 'kimi-k2.5.json'}"]  # fmt: skip
    missing = CliRunner().invoke(main, ["run", manifest, *args, "--out", str(tmp_path / "early")])
    assert missing.exit_code == 2 and "anchor file does not exist; freeze it first with `kimi-jax anchor freeze" in \
        missing.output  # fmt: skip
    frozen = _invoke("anchor", "freeze", manifest, *args)
    assert f"anchor frozen to {tmp_path / 'anchors' / 'kimi-k2.5.json'}" in frozen.output
    _invoke("run", manifest, *args, "--out", str(tmp_path / "bundle"))
    _verified(tmp_path / "bundle")


def test_the_vindex_manifest_runs_as_shipped(tmp_path):
    result = _invoke("vindex", str(MANIFESTS / "vindex-demo.yaml"), "--out", str(tmp_path / "run"))
    assert (tmp_path / "run.vindex" / "summary.json").is_file() and "\r" not in result.stderr


def test_the_full_shape_manifest_generates_and_plans(full_shape_checkpoint, tmp_path):
    manifest = load_manifest(str(MANIFESTS / "full-shape.yaml"), out_dir=str(tmp_path / "bundle"))
    plan = prepare_run(manifest)  # the preset generated once for the session, where the manifest looks for it
    assert plan.index.root == full_shape_checkpoint
    cfg = plan.index.config
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.vocab_size) == (61, 384, 163840)
    assert sum(h.file_size for h in plan.index.shards) > 590e9  # the real layout's size, as file holes
