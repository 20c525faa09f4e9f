"""``kimi-jax compare``: manifests (will the runs be identical?) and bundles (where do they diverge?)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.errors import ManifestError
from kimi_jax.ledger.archive import archive_bundle
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute
from kimi_jax.verify.compare import CompareError, compare_paths
from kimi_jax.verify.compare_bundles import compare_bundles
from kimi_jax.verify.compare_manifests import compare_manifests, compare_resolved


def _manifest(path: Path, checkpoint, extra: str = "", synthetic: str | None = None) -> Path:
    model = f"  synthetic: {synthetic}\n" if synthetic else f"  checkpoint: {checkpoint}\n"
    path.write_text(f"version: 1\nmodel:\n{model}prompt:\n  tokens: [7, 300, 7]\ngenerate:\n  max_new_tokens: 3\n"
                    f"output:\n  dir: out-{path.stem}\n{extra}")  # fmt: skip
    return path


# -- manifests ----------------------------------------------------------------------------------


def test_capture_storage_output_anchor_do_not_change_results(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    a = _manifest(tmp_path / "a.yaml", ckpt)
    b = _manifest(tmp_path / "b.yaml", ckpt, "capture: []\nstorage:\n  prefetch: false\n  evict_page_cache: true\n"
                                             "anchor: anchor.json\n")  # fmt: skip
    result = compare_manifests(a, b)
    assert result.verdict == "bitwise identical runs expected" and result.identical
    assert result.result_differences == []
    assert {d.field for d in result.neutral_differences} == {"capture", "storage.prefetch", "storage.evict_page_cache",
                                                             "anchor", "output.dir"}  # fmt: skip
    cli = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert cli.exit_code == 0, cli.output
    assert "verdict: bitwise identical runs expected" in cli.output
    assert "capture: " in cli.output and "non-perturbing" in cli.output


def test_dtype_difference_is_not_identical(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    a = _manifest(tmp_path / "a.yaml", ckpt)
    b = _manifest(tmp_path / "b.yaml", ckpt, "compute:\n  dtype: bfloat16\n")
    result = compare_manifests(a, b)
    assert [d.field for d in result.result_differences] == ["compute.dtype"]
    assert result.verdict == "not expected to be identical: compute.dtype differs"
    cli = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert cli.exit_code == 1 and "compute.dtype" in cli.output


def test_the_manifest_report_says_each_thing_once(tmp_path):
    # an absent section is one line; a reason shared by neighbouring fields is given once, after them;
    # the verdict names the fields, whose values are listed above it; exit code 1: not identical
    gone = tmp_path / "gone"
    a = _manifest(tmp_path / "a.yaml", gone)
    b = _manifest(tmp_path / "b.yaml", gone, "storage:\n  prefetch: false\n  io_retries: 5\ncompute:\n  dtype: bfloat16\n")
    b.write_text(b.read_text().replace("  max_new_tokens: 3\n", "  max_new_tokens: 3\n  sampling: {seed: 3}\n"))
    cli = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert cli.exit_code == 1
    lines = cli.stdout.splitlines()
    section = lambda title: lines[lines.index(title) + 1:]  # noqa: E731
    result = section("differences that can change results:")
    assert result[0] == "  compute.dtype: 'float32' vs 'bfloat16'" and result[1].startswith("    (")
    assert result[2].startswith("  generate.sampling: null vs {") and result[3].startswith("    (")
    neutral = section("differences that cannot change results:")
    assert neutral[2:5] == ["  storage.io_retries: 3 vs 5", "  storage.prefetch: true vs false",
                            "    (storage settings change how and when bytes are read (prefetch, retries, page cache, "
                            "residency budget, expert cache, speculative reads, digest checks), not which bytes a step "
                            "uses or what is computed)"]  # fmt: skip
    assert sum("storage settings change" in line for line in lines) == 1
    assert lines[-1] == "verdict: not expected to be identical: compute.dtype, generate.sampling differ"
    # the missing checkpoint is said once (both manifests name it)
    assert [line for line in lines if "not available" in line] == [
        f"note: checkpoint {gone} is not available; the checkpoints were compared by path only"]


def test_dequant_difference_is_not_identical(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    a = _manifest(tmp_path / "a.yaml", ckpt)
    b = _manifest(tmp_path / "b.yaml", ckpt, "compute:\n  dequant: bf16-rounded\n")
    result = compare_manifests(a, b)
    assert [d.field for d in result.result_differences] == ["compute.dequant"]
    assert "dequantized differently" in result.result_differences[0].why
    assert result.verdict == "not expected to be identical: compute.dequant differs"
    spelled = _manifest(tmp_path / "c.yaml", ckpt, "compute:\n  dequant: exact\n")
    assert compare_manifests(a, spelled).identical  # the default, spelled out


def test_a_manifest_without_dequant_reads_as_the_old_rounding(tiny_checkpoints, tmp_path):
    """A bundle of kimi-jax 0.1.0 has no compute.dequant in its manifest.json: that version always
    rounded to bfloat16, and compare says so instead of reporting a missing value."""
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])}, "prompt": {"tokens": [7]},
            "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    widened = {"matmul": "widened"}  # what 0.1.0 computed, and what a manifest.json without the field records
    exact = parse_manifest_dict({**data, "compute": widened}).resolved_dict()
    rounded = parse_manifest_dict({**data, "compute": {**widened, "dequant": "bf16-rounded"}}).resolved_dict()
    old = {**exact, "compute": {"dtype": "float32"}}
    result = compare_resolved(old, exact, name_a="old/manifest.json")
    assert result.verdict == "not expected to be identical: compute.dequant differs"
    assert result.notes[0] == ("old/manifest.json has no compute.dequant: read as bf16-rounded (kimi-jax 0.1.0, "
                               "which did not record the mode)")  # fmt: skip
    assert compare_resolved(old, rounded).identical
    assert old["compute"] == {"dtype": "float32"}  # the caller's dict is not changed


def test_only_max_new_tokens_differs(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    a = _manifest(tmp_path / "a.yaml", ckpt)
    b = _manifest(tmp_path / "b.yaml", ckpt, "capture: [norms]\n")
    b.write_text(b.read_text().replace("max_new_tokens: 3", "max_new_tokens: 8"))
    for name in ("a", "b"):  # full recompute: step n depends only on the context
        path = tmp_path / f"{name}.yaml"
        path.write_text(path.read_text().replace("generate:\n", "generate:\n  kv_cache: false\n"))
    result = compare_manifests(a, tmp_path / "b.yaml")
    assert result.verdict == "identical for the first 3 steps (only max_new_tokens differs)"
    assert result.identical_steps == 3 and not result.identical
    # with the KV cache, the cache length depends on max_new_tokens: no promise
    for name in ("a", "b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(path.read_text().replace("kv_cache: false", "kv_cache: true"))
    result = compare_manifests(a, tmp_path / "b.yaml")
    assert result.verdict.startswith("not expected to be identical: generate.max_new_tokens differs (3 vs 8) with "
                                     "generate.kv_cache on")  # fmt: skip


def test_checkpoint_identity_decides_not_the_path(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["kimi-k2.5"]
    twin = Path(shutil.copytree(ckpt, tmp_path / "twin"))
    result = compare_manifests(_manifest(tmp_path / "a.yaml", ckpt), _manifest(tmp_path / "b.yaml", twin))
    assert result.identical
    assert any("same identity" in n and "weight bytes were not compared" in n for n in result.notes)

    other = compare_manifests(_manifest(tmp_path / "a.yaml", ckpt),
                              _manifest(tmp_path / "c.yaml", tiny_checkpoints["deepseek-v3"]))  # fmt: skip
    assert not other.identical
    assert any(d.field.startswith("model") for d in other.result_differences)
    assert "not expected to be identical: model" in other.verdict


def test_missing_checkpoints_and_synthetic_specs(tmp_path):
    gone = tmp_path / "gone"
    same = compare_manifests(_manifest(tmp_path / "a.yaml", gone), _manifest(tmp_path / "b.yaml", gone))
    assert same.identical and any("compared by path only" in n for n in same.notes)
    apart = compare_manifests(_manifest(tmp_path / "a.yaml", gone), _manifest(tmp_path / "c.yaml", tmp_path / "gone2"))
    assert not apart.identical and "could not be compared" in apart.result_differences[0].why

    # A missing checkpoint is no error here, but every other problem is, with its FILE:LINE.
    bad = _manifest(tmp_path / "bad.yaml", gone, "compute:\n  dtype: float16\n")
    with pytest.raises(ManifestError, match=rf"{bad}:11: compute.dtype: must be one of") as err:
        compare_manifests(bad, _manifest(tmp_path / "b.yaml", gone))
    assert "model.checkpoint" not in str(err.value)

    seed0 = _manifest(tmp_path / "s0.yaml", None, synthetic="{preset: tiny, seed: 0}")
    seed1 = _manifest(tmp_path / "s1.yaml", None, synthetic="{preset: tiny, seed: 1}")
    result = compare_manifests(seed0, seed1)
    assert [d.field for d in result.result_differences] == ["model.synthetic.seed"]


# -- bundles ------------------------------------------------------------------------------------


def _run(tmp: Path, ckpt, name: str, prompt: list[int], capture=("norms", "routing", "logits")) -> Path:
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": prompt},
            "generate": {"max_new_tokens": 2}, "capture": list(capture),
            "output": {"dir": str(tmp / name)}}  # fmt: skip
    execute(prepare_run(parse_manifest_dict(data, source=str(tmp / f"{name}.yaml"))), echo=lambda *_: None,
            progress=False)  # fmt: skip
    return tmp / name


@pytest.fixture(scope="module")
def bundles(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    ckpt = tiny_checkpoints["kimi-k2.5"]
    return {"a": _run(tmp, ckpt, "a", [7, 300, 7]), "b": _run(tmp, ckpt, "b", [7, 300, 8]),
            "bare": _run(tmp, ckpt, "bare", [7, 300, 9], capture=())}  # fmt: skip


def test_different_prompts_diverge_at_step_zero_layer_zero(bundles):
    result = compare_bundles(bundles["a"], bundles["b"])
    assert not result.identical
    assert result.first_divergent_step == 0
    assert result.first_divergent_layer == 0 and result.layer_detail.startswith("norm_in ")
    assert not result.steps[0].context_equal and not result.steps[0].hidden_equal
    assert result.steps[0].max_abs_logits > 0 and result.steps[0].max_abs_hidden > 0
    assert result.platform_differences == []
    assert [d.field for d in result.manifest.result_differences] == ["prompt.tokens"]
    cli = CliRunner().invoke(main, ["compare", str(bundles["a"]), str(bundles["b"])])
    assert cli.exit_code == 1
    assert "first divergent step: 0" in cli.output
    assert "first layer where norms differ in step 0: layer 0 (norm_in" in cli.output
    assert cli.output.rstrip().endswith("verdict: DIFFERENT")


def test_without_norms_no_layer_is_named(bundles):
    result = compare_bundles(bundles["a"], bundles["bare"])
    assert result.first_divergent_step == 0 and result.first_divergent_layer is None
    assert "norms were not captured" in result.layer_detail


def test_same_bundle_twice_is_identical(bundles, tmp_path):
    result = compare_bundles(bundles["a"], bundles["a"])
    assert result.identical and result.first_divergent_step is None
    assert all(s.max_abs_logits == 0.0 and s.max_abs_hidden == 0.0 for s in result.steps)
    archive = archive_bundle(bundles["a"], tmp_path / "a.tar.gz")
    cli = CliRunner().invoke(main, ["compare", str(bundles["a"]), str(archive)])
    assert cli.exit_code == 0, cli.output
    assert "verdict: IDENTICAL" in cli.output


def test_a_manifest_and_a_bundle_cannot_be_compared(bundles, tmp_path):
    manifest = _manifest(tmp_path / "m.yaml", tmp_path)
    with pytest.raises(CompareError, match="cannot compare a bundle"):
        compare_paths(bundles["a"], manifest)
    cli = CliRunner().invoke(main, ["compare", str(manifest), str(bundles["a"])])
    assert cli.exit_code == 2 and "cannot compare a bundle" in cli.output


def test_tokenizer_sampling_and_stop_rules_change_results(tiny_checkpoints, tmp_path):
    copy = Path(shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "copy"))
    a = _manifest(tmp_path / "a.yaml", tiny_checkpoints["kimi-k2.5"])
    b = _manifest(tmp_path / "b.yaml", copy)
    assert compare_manifests(a, b).identical  # another folder with the same identity
    (copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    result = compare_manifests(a, b)
    assert [d.field for d in result.result_differences] == ["model (checkpoint tokenizer_digest)"]
    assert "a different tokenizer encodes the same text to other ids" in result.result_differences[0].why
    assert not result.identical and "model (checkpoint tokenizer_digest) differs" in result.verdict
    for setting in ("  sampling: {seed: 3}\n", "  stop: [END]\n", "  ignore_eos: true\n"):
        c = tmp_path / "c.yaml"
        c.write_text(a.read_text().replace("  max_new_tokens: 3\n", "  max_new_tokens: 3\n" + setting))
        changed = compare_manifests(a, c)
        assert {d.field.split(".")[1] for d in changed.result_differences} == {setting.split(":")[0].strip()}
        assert not changed.identical
