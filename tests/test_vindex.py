"""kimi-jax vindex: singular values against numpy, analytic var@64, routing counts against the
engine's own records, resume after kill -9, errors before compute, the CLI and the HTML page."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from kimi_jax.errors import ManifestError
from kimi_jax.ledger.checksums import verify_checksums
from kimi_jax.manifest import load_manifest
from kimi_jax.storage import codecs
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.synth import logical_value, synth_checkpoint
from kimi_jax.cli import main as cli_main
from kimi_jax.vindex.plan import plan_vindex, vindex_dir
from kimi_jax.vindex.runner import run_vindex
from kimi_jax.vindex.routing import (
    LedgerError,
    layer_routing_stats,
    read_ledger,
    trace_from_steps,
)
from kimi_jax.vindex.spectra import layer_summary, var_at_k

REPO = Path(__file__).resolve().parents[1]
# down_proj is [hidden 128, moe_intermediate 256]: 128 singular values, so var@64 is defined.
DIMS = dict(hidden_size=128, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=3,
            n_routed_experts=8, num_experts_per_tok=2)  # fmt: skip
N_SV = 128
# var@64's numerator sums 64 Gram eigenvalues, each within a small multiple of eps32 * s_max^2:
# measured 1.4e-6 on the flat spectrum stored as exact int4 products (with every product rounded
# to bf16, as before exact dequantization, these rows happened to give an exact Gram matrix).
VAR64_ABS = 3e-6
PROMPT = [1792, 7, 300]

# Layer 1's experts get matrices with a known spectrum: A = diag(s) H P / 16 with H the first 128
# rows of a 256x256 Hadamard matrix and P a signed column permutation. Its rows are orthogonal
# with norms s_i, and every entry of row i has magnitude s_i / 16, so bf16, int4 (per-group scale)
# and fp8 (per-block scale) storage all keep the rows orthogonal and of uniform magnitude: the
# stored matrix's singular values are exactly its row norms, known without any SVD.
SPECTRA = {0: ("flat", 0.0), 1: ("power", 0.5), 2: ("power", 1.0), 3: ("flat", 0.0), 4: ("power", 2.0)}


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def ideal_spectrum(expert: int) -> np.ndarray:
    kind, a = SPECTRA[expert]
    i = np.arange(1, N_SV + 1, dtype=np.float64)
    return np.ones(N_SV) if kind == "flat" else i**-a


def structured(expert: int, shape: tuple[int, int]) -> np.ndarray:
    m, n = shape
    rng = np.random.default_rng(100 + expert)
    h = hadamard(n)[:m] * rng.choice([-1.0, 1.0], size=n)
    h = h[:, rng.permutation(n)]
    return (ideal_spectrum(expert)[:, None] * h / math.sqrt(n)).astype(np.float32)


def inject(name: str, shape: tuple[int, ...]) -> np.ndarray:
    m = re.fullmatch(r"layers\.1\.mlp\.experts\.(\d+)\.down_proj\.weight", name)
    if m and int(m.group(1)) in SPECTRA:
        return structured(int(m.group(1)), shape)
    return logical_value(0, name, shape)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindex-ckpt")
    return {layout: synth_checkpoint(root / layout, "tiny", layout, seed=0, values=inject, **DIMS)
            for layout in ("kimi-k2.5", "hf-bf16", "kimi-k2-fp8")}  # fmt: skip


def write_manifest(path: Path, checkpoint: Path, out: Path, vindex: str = "", extra: str = "") -> Path:
    text = textwrap.dedent(f"""\
        version: 1
        model:
          checkpoint: {checkpoint}
        prompt:
          tokens: {PROMPT}
        generate:
          max_new_tokens: 3
          kv_cache: true
        output:
          dir: {out}
        """) + extra  # fmt: skip
    if vindex:
        text += "vindex:\n" + textwrap.indent(textwrap.dedent(vindex), "  ")
    path.write_text(text)
    return path


def run(manifest: Path, **kw):
    plan = plan_vindex(load_manifest(manifest))
    return plan, run_vindex(plan, progress=False, echo=lambda *_: None, **kw)


def layer_json(out: Path, phase: int, layer: int) -> dict:
    return json.loads((vindex_dir(out) / f"phase{phase}" / f"layer-{layer:03d}.json").read_text())


def dequantized(index, layer: int, expert: int | None, mode: str = "exact") -> np.ndarray:
    """An expert's (or, expert None, the dense layer's) down_proj as the codecs module
    dequantizes it in ``mode`` (numpy, float64)."""
    lm = index.layers[layer]
    entry = lm.base[f"layers.{layer}.mlp.down_proj.weight"] if expert is None else lm.experts[expert]["down_proj"]
    with ShardReader() as reader:
        parts = reader.read_weights([entry], layer=layer)[entry.name]
    if entry.format == "int4":
        w = codecs.dequant_int4(parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], 32, mode)
    elif entry.format == "fp8":
        w = codecs.dequant_fp8_block(parts["weight"], parts["weight_scale_inv"], (128, 128), mode)
    else:
        w = parts["weight"]
    return np.asarray(w, dtype=np.float64)


@pytest.fixture(scope="module")
def phase1_runs(ckpts, tmp_path_factory):
    """Phases 1 and 2 with every singular value kept (top_singular_values 256), per layout."""
    outs = {}
    for layout, ckpt in ckpts.items():
        base = tmp_path_factory.mktemp(f"p1-{layout}")
        manifest = write_manifest(base / "m.yaml", ckpt, base / "out", "phases: [1, 2]\ntop_singular_values: 256\n")
        run(manifest)
        outs[layout] = base / "out"
    return outs


# ------------------------------------------------------------------------------------ phase 1


@pytest.mark.parametrize("layout", ["kimi-k2.5", "hf-bf16", "kimi-k2-fp8"])
def test_singular_values_match_numpy_on_the_same_dequantized_matrices(ckpts, phase1_runs, layout):
    index = open_checkpoint(ckpts[layout])
    for layer in (1, 2):
        data = layer_json(phase1_runs[layout], 1, layer)
        assert data["storage"] == [{"kimi-k2.5": "int4", "hf-bf16": "plain", "kimi-k2-fp8": "fp8"}[layout]]
        for rec in data["experts"]:
            w = dequantized(index, layer, rec["expert"])
            ref = np.linalg.svd(w, compute_uv=False)
            got = np.array(rec["top"])
            assert got.shape == ref.shape == (N_SV,)
            big = ref >= ref[0] / 10
            np.testing.assert_allclose(got[big], ref[big], rtol=1e-4, atol=0)
            assert np.max(np.abs(got - ref)) <= 2e-3 * ref[0]
            if layer == 2:  # seeded random matrices are well conditioned: every value to 1e-4
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=0)
            frob2 = float(np.sum(w * w))
            assert rec["frobenius"] == pytest.approx(math.sqrt(frob2), rel=1e-6)
            assert rec["var_at_64"] == pytest.approx(float(np.sum(ref[:64] ** 2)) / frob2, abs=VAR64_ABS)
            assert rec["s0_over_s1"] == pytest.approx(ref[0] / ref[1], rel=1e-4)
    dense = layer_json(phase1_runs[layout], 1, 0)
    ref = np.linalg.svd(dequantized(index, 0, None), compute_uv=False)
    assert dense["kind"] == "dense" and dense["matrix"] == "mlp.down_proj" and dense["n_matrices"] == 1
    np.testing.assert_allclose(dense["matrices"][0]["top"], ref, rtol=1e-4)


@pytest.mark.parametrize("layout", ["kimi-k2.5", "kimi-k2-fp8"])
def test_spectra_follow_compute_dequant(ckpts, phase1_runs, layout, tmp_path):
    """By default the spectra are of the exact products; ``compute.dequant: bf16-rounded`` gives
    those of the rounded weights. Layer 1's structured experts have one magnitude per row, so
    rounding it moves a singular value by up to 2^-9, far beyond the 1e-4 guarantee: the two
    runs are told apart."""
    index = open_checkpoint(ckpts[layout])
    manifest = write_manifest(tmp_path / "m.yaml", ckpts[layout], tmp_path / "out",
                              "phases: [1]\nlayers: [1]\ntop_singular_values: 256\n",
                              extra="compute:\n  dequant: bf16-rounded\n")  # fmt: skip
    run(manifest)
    rounded = {r["expert"]: r for r in layer_json(tmp_path / "out", 1, 1)["experts"]}
    exact = {r["expert"]: r for r in layer_json(phase1_runs[layout], 1, 1)["experts"]}
    apart = 0.0
    for expert in SPECTRA:
        ref_rounded = np.linalg.svd(dequantized(index, 1, expert, "bf16-rounded"), compute_uv=False)
        ref_exact = np.linalg.svd(dequantized(index, 1, expert), compute_uv=False)
        big = ref_exact >= ref_exact[0] / 10
        np.testing.assert_allclose(np.array(rounded[expert]["top"])[big], ref_rounded[big], rtol=1e-4, atol=0)
        np.testing.assert_allclose(np.array(exact[expert]["top"])[big], ref_exact[big], rtol=1e-4, atol=0)
        apart = max(apart, float(np.max(np.abs(ref_rounded[big] - ref_exact[big]) / ref_exact[big])))
    assert apart > 1e-3
    summary = json.loads((vindex_dir(tmp_path / "out") / "summary.json").read_text())
    assert summary["settings"]["dequant"] == "bf16-rounded"


@pytest.mark.parametrize("layout", ["kimi-k2.5", "hf-bf16"])
def test_var64_equals_its_analytic_value_for_known_spectra(ckpts, phase1_runs, layout):
    index = open_checkpoint(ckpts[layout])
    records = {r["expert"]: r for r in layer_json(phase1_runs[layout], 1, 1)["experts"]}
    # Storage rounds each row's magnitude once (bf16: 2^-9) or twice (int4 scale, then product).
    delta = 2 * 2.0**-9 if layout == "hf-bf16" else 4 * 2.0**-9
    for expert, (kind, a) in SPECTRA.items():
        s = ideal_spectrum(expert)
        ideal = float(np.sum(s[:64] ** 2) / np.sum(s**2))
        # The stored matrix's own spectrum, analytically: its rows are orthogonal.
        w = dequantized(index, 1, expert)
        norms = np.sort(np.sqrt(np.sum(w * w, axis=1)))[::-1]
        own = float(np.sum(norms[:64] ** 2) / np.sum(norms**2))
        got = records[expert]["var_at_64"]
        assert got == pytest.approx(own, abs=VAR64_ABS)
        if kind == "flat":
            assert got == pytest.approx(64 / N_SV, abs=VAR64_ABS)  # exactly 0.5 in every format
        else:
            lo, hi = ideal * (1 - delta) / (1 + delta), ideal * (1 + delta) / (1 - delta)
            assert lo - VAR64_ABS <= got <= min(hi, 1.0) + VAR64_ABS, (expert, got, ideal)
        top, big = np.array(records[expert]["top"]), norms >= norms[0] / 10
        np.testing.assert_allclose(top[big], norms[big], rtol=1e-4)  # the guarantee, against the analytic values
        assert np.max(np.abs(top - norms)) <= 2e-3 * norms[0]


def test_layer_summary_quartiles_class_and_saturation(phase1_runs):
    data = layer_json(phase1_runs["hf-bf16"], 1, 2)
    values = [r["var_at_64"] for r in data["experts"]]
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    assert data["var_at_64"]["median"] == pytest.approx(med)
    assert (data["var_at_64"]["q25"], data["var_at_64"]["q75"]) == (pytest.approx(q25), pytest.approx(q75))
    assert data["spectral_class"] == ("dissolved" if med < 0.15 else "non-dissolved")
    assert data["n_singular"] == N_SV and data["saturated"] is False
    # With <= 64 singular values all the variance is in the top 64: var@64 = 1, class undetermined.
    assert var_at_k(np.array([3.0, 2.0, 1.0]), 14.0) == 1.0
    tiny = layer_summary([{"var_at_64": 1.0, "s0_over_s1": 1.1, "frobenius": 2.0}] * 3, n_singular=64)
    assert tiny["spectral_class"] == "undetermined" and tiny["saturated"] is True
    flat = layer_summary([{"var_at_64": 0.1, "s0_over_s1": 1.0, "frobenius": 1.0}] * 2, n_singular=2048)
    assert flat["spectral_class"] == "dissolved"
    # Phase 2: router [8, 128] has 8 singular values: saturated.
    router = layer_json(phase1_runs["hf-bf16"], 2, 1)
    assert router["shape"] == [8, 128] and len(router["singular_values"]) == 8
    assert router["var_at_64"] == 1.0 and router["spectral_class"] == "undetermined"


# ------------------------------------------------------------------------------------ phase 3


def direct_counts(steps, layer: int, n_experts: int):
    """Count straight from engine records (KV cache on: every record row is a new position)."""
    counts, weight = np.zeros(n_experts, int), np.zeros(n_experts)
    for step in steps:
        rec = next(r for r in step.layers if r.layer == layer)
        for row_e, row_w in zip(rec.experts, rec.routing_weights):
            for e, w in zip(row_e, row_w):
                counts[e] += 1
                weight[e] += w
    return counts, weight


@pytest.fixture(scope="module")
def phase3_run(ckpts, tmp_path_factory):
    import kimi_jax.model.engine as engine_mod

    base = tmp_path_factory.mktemp("p3")
    captured = []
    original = engine_mod.Engine.generate

    def spy(self, *args, **kwargs):
        steps = original(self, *args, **kwargs)
        captured.append(steps)
        return steps

    manifest = write_manifest(base / "m.yaml", ckpts["kimi-k2.5"], base / "out",
                              "phases: [3]\nprompts: [[1792, 7, 300], [1792, 11]]\n")  # fmt: skip
    engine_mod.Engine.generate = spy
    try:
        plan, summary = run(manifest)
    finally:
        engine_mod.Engine.generate = original
    return SimpleNamespace(base=base, out=base / "out", manifest=manifest, steps=captured, summary=summary, plan=plan)


def test_routing_counts_equal_a_direct_count_of_engine_records(phase3_run):
    assert len(phase3_run.steps) == 2
    for layer in (1, 2):
        data = layer_json(phase3_run.out, 3, layer)
        counts, weight = np.zeros(8, int), np.zeros(8)
        for steps in phase3_run.steps:
            c, w = direct_counts(steps, layer, 8)
            counts, weight = counts + c, weight + w
        assert data["counts"] == counts.tolist()
        assert data["positions"] == (3 + 3 - 1) + (2 + 3 - 1)
        assert sum(data["counts"]) == data["positions"] * 2 == data["selections"]
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log(p)).sum())
        assert data["entropy"] == pytest.approx(entropy)
        assert data["normalised_entropy"] == pytest.approx(entropy / math.log(8))
        top = sorted(range(8), key=lambda e: (-counts[e], e))[:2]
        assert data["top_k_experts"] == top
        assert data["top_k_weight_share"] == pytest.approx(weight[top].sum() / weight.sum())
        # Per position: position 0 sees both prompts, position 4 only the first.
        pos = {p["position"]: p for p in data["per_position"]}
        assert pos[0]["sequences"] == 2 and pos[4]["sequences"] == 1
        assert sum(c for _, c in pos[0]["counts"]) == 4
    assert phase3_run.summary["phase3"]["sources"] == {"prompts": 2, "bundles": 0}


def test_positions_count_once_without_kv_cache():
    """Full recompute: step s covers every position again; only its newest row is new."""
    def rec(rows):
        return SimpleNamespace(layer=1, kind="moe", experts=[r[0] for r in rows], routing_weights=[r[1] for r in rows])

    a, b, c = ([0, 1], [0.6, 0.4]), ([2, 3], [0.5, 0.5]), ([1, 2], [0.9, 0.1])
    steps = [SimpleNamespace(layers=[rec([a, b])]), SimpleNamespace(layers=[rec([a, b, c])])]
    experts, weights = trace_from_steps(steps)[1]
    assert experts.tolist() == [[0, 1], [2, 3], [1, 2]]
    stats = layer_routing_stats([trace_from_steps(steps)], 1, 4, 2)
    assert stats["counts"] == [1, 2, 2, 1] and stats["positions"] == 3


def test_ledger_bundles_give_the_engine_statistics(phase3_run, tmp_path):
    bundles = []
    for i, steps in enumerate(phase3_run.steps):
        ledger = {"steps": [{"index": s.index, "layers": [
            {"layer": r.layer, "kind": r.kind, "experts": r.experts, "routing_weights": r.routing_weights}
            for r in s.layers]} for s in steps]}  # fmt: skip
        (tmp_path / f"b{i}").mkdir()
        (tmp_path / f"b{i}" / "ledger.json").write_text(json.dumps(ledger))
        bundles.append(str(tmp_path / f"b{i}"))
    manifest = write_manifest(tmp_path / "m.yaml", phase3_run.plan.index.root, tmp_path / "out",
                              f"phases: [3]\nbundles: {json.dumps(bundles)}\n")  # fmt: skip
    _, summary = run(manifest)
    assert summary["phase3"]["sources"] == {"prompts": 0, "bundles": 2}
    for layer in (1, 2):
        from_ledger, from_engine = layer_json(tmp_path / "out", 3, layer), layer_json(phase3_run.out, 3, layer)
        for key in ("counts", "positions", "entropy", "top_k_experts", "per_position"):
            assert from_ledger[key] == from_engine[key]
    # A malformed ledger names the file and the JSON path.
    (tmp_path / "b0" / "ledger.json").write_text(json.dumps({"steps": [{"layers": [{"layer": 1, "kind": "moe",
                                                 "experts": [[0, 9]], "routing_weights": [[0.5, 0.5]]}]}]}))  # fmt: skip
    with pytest.raises(LedgerError, match=r"b0/ledger.json: steps\[0\]\.layers\[0\]\.experts: expert ids must be in 0\.\.7"):
        read_ledger(tmp_path / "b0", 3, 8)
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: vindex.bundles.0: .*steps\[0\]\.layers\[0\]\.experts"):
        plan_vindex(load_manifest(manifest))
    # A run that did not capture routing has nothing to count: said so, not guessed.
    (tmp_path / "b1" / "ledger.json").write_text(json.dumps({"steps": [{"layers": [{"layer": 2, "kind": "moe",
                                                 "bytes_read": 10}]}]}))  # fmt: skip
    with pytest.raises(LedgerError, match=r"b1/ledger.json: steps\[0\]\.layers\[0\]\.experts: missing: .*'routing'"):
        read_ledger(tmp_path / "b1", 3, 8)


def _sparse(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk, no time


@pytest.mark.parametrize("name, write, fragment", [
    ("deep", lambda f: f.write_text("[" * 100_000 + "]" * 100_000), "JSON nested too deeply"),
    ("huge-int", lambda f: f.write_text('{"steps": [{"layers": [{"layer": 1, "kind": "moe", "experts": [[1' + "0" * 30
                                        + ']], "routing_weights": [[1.0]]}]}]}'), "expected integer expert ids"),
    ("int-past-4300-digits", lambda f: f.write_text('{"steps": [' + "9" * 5000 + "]}"), "not valid JSON"),
    ("big-weight", lambda f: f.write_text('{"steps": [{"layers": [{"layer": 1, "kind": "moe", "experts": [[1]], '
                                          '"routing_weights": [[1' + "0" * 400 + "]]}]}]}"), "finite numbers"),
    ("300-MiB", lambda f: _sparse(f, 300 << 20), "ledger is 314,572,800 bytes, more than the 268,435,456"),
    ("fifo", lambda f: os.mkfifo(f), "ledger is a FIFO; expected a regular file"),
])  # fmt: skip
def test_hostile_ledgers_are_read_as_verify_reads_them(tmp_path, name, write, fragment):
    """Main read bundle ledgers with plain json.loads: MemoryError, RecursionError, OverflowError."""
    (tmp_path / "b").mkdir()
    write(tmp_path / "b" / "ledger.json")
    with pytest.raises(LedgerError, match=re.escape(fragment)):
        read_ledger(tmp_path / "b", 3, 8)


# ------------------------------------------------------------------------------------- resume


KILLER = """
import os, signal, sys
from kimi_jax.manifest import load_manifest
from kimi_jax.vindex.plan import plan_vindex
from kimi_jax.vindex.runner import run_vindex
plan = plan_vindex(load_manifest(sys.argv[1]))
def hook(phase, layer, path):
    if (phase, layer) == (1, 1):
        os.kill(os.getpid(), signal.SIGKILL)
run_vindex(plan, progress=False, on_layer_done=hook)
"""


def test_kill_9_then_restart_continues_and_ends_identical(ckpts, phase1_runs, tmp_path):
    ckpt = ckpts["kimi-k2.5"]
    manifest = write_manifest(tmp_path / "m.yaml", ckpt, tmp_path / "out", "phases: [1, 2]\ntop_singular_values: 256\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(manifest)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = vindex_dir(tmp_path / "out")
    done = {p.name: p.stat() for p in (out / "phase1").glob("layer-*.json")}
    assert sorted(done) == ["layer-000.json", "layer-001.json"]
    assert not (out / "summary.json").exists() and not (out / "CHECKSUMS.b3").exists()
    (out / "phase1" / ".layer-002.json.tmp-99999").write_text("{half a file")  # what a kill mid-write leaves

    run(manifest)
    record = json.loads((out / "run.json").read_text())
    assert record["computed_layers"] == {"phase1": [2], "phase2": [1, 2]}
    assert record["reused_layers"] == {"phase1": [0, 1]}
    for name, st in done.items():  # finished layers were not rewritten
        again = (out / "phase1" / name).stat()
        assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not list(out.rglob(".*.tmp-*"))
    # Identical to the uninterrupted run of the same settings.
    ref = vindex_dir(phase1_runs["kimi-k2.5"])
    for rel in ["summary.json", "vindex.html"] + [f"phase{p}/layer-{i:03d}.json" for p, i in
                                                   [(1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]]:  # fmt: skip
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert verify_checksums(out) == []
    # Changed settings invalidate the stored layers (their key differs): all recomputed.
    plan = plan_vindex(load_manifest(manifest, ["vindex.top_singular_values=4", "vindex.phases=[1]"]))
    run_vindex(plan, progress=False, echo=lambda *_: None)
    assert json.loads((out / "run.json").read_text())["computed_layers"] == {"phase1": [0, 1, 2]}
    assert len(layer_json(tmp_path / "out", 1, 1)["experts"][0]["top"]) == 4


def test_phase3_resume_reuses_the_recorded_engine_runs(phase3_run, monkeypatch):
    out = vindex_dir(phase3_run.out)
    before = (out / "phase3" / "layer-002.json").read_bytes()
    (out / "phase3" / "layer-002.json").unlink()
    import kimi_jax.model.engine as engine_mod

    monkeypatch.setattr(engine_mod, "Engine", lambda *a, **k: pytest.fail("the engine ran again"))
    run(phase3_run.manifest)
    assert (out / "phase3" / "layer-002.json").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["computed_layers"] == {"phase3": [2]}


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("vindex, field, fragment", [
    ("layers: [0, 7]\n", "vindex.layers.1", "layer 7 is out of range"),
    ("experts: [3, 8]\n", "vindex.experts.1", "expert id 8 is out of range"),
    ("phases: [2]\nlayers: [0]\n", "vindex.layers", "need a MoE layer"),
    ("phases: [3]\nprompts: [[1, 99999]]\n", "vindex.prompts.0.1", "outside the vocabulary"),
    ("phases: [3]\nbundles: [nowhere]\n", "vindex.bundles.0", "ledger.json does not exist"),
])  # fmt: skip
def test_bad_input_is_reported_before_compute(ckpts, tmp_path, vindex, field, fragment):
    manifest = write_manifest(tmp_path / "m.yaml", ckpts["hf-bf16"], tmp_path / "out", vindex)
    with pytest.raises(ManifestError) as err:
        plan_vindex(load_manifest(manifest))
    line = manifest.read_text().splitlines().index(next(l for l in manifest.read_text().splitlines()
                                                        if l.strip().startswith(field.split(".")[1]))) + 1  # fmt: skip
    assert f"{manifest}:{line}: {field}: " in str(err.value) and fragment in str(err.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_experts_is_an_error(tmp_path):
    dense = synth_checkpoint(tmp_path / "dense", "tiny", "hf-bf16", seed=0, num_hidden_layers=2, first_k_dense_replace=2)
    manifest = write_manifest(tmp_path / "m.yaml", dense, tmp_path / "out", "phases: [1, 3]\n")
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: vindex.phases: phase\(s\) 1 \(expert spectra\), 3 "
                                            r"\(routing statistics\) need routed experts"):  # fmt: skip
        plan_vindex(load_manifest(manifest))


# ------------------------------------------------------------------------ CLI, HTML, checksums


def test_cli_runs_and_reports_errors(ckpts, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", ckpts["hf-bf16"], tmp_path / "unused")
    runner = CliRunner()
    res = runner.invoke(cli_main, ["vindex", str(manifest), "--set", "vindex.phases=[1, 2]", "--set", "vindex.layers=[1]",
                                   "--set", "vindex.experts=[0, 3]", "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 0, res.output
    # progress on a stderr that is not a terminal: plain lines, no carriage-return redraws (as run)
    assert "\r" not in res.stderr and "phase 1 layer 1 (1/1 to do, 1 selected): done 2 of 2 matrix" in res.stderr
    assert "phase 2 routers: done 1 of 1 layer" in res.stderr, res.stderr
    out = vindex_dir(tmp_path / "o")
    assert "var@64" in res.output and sorted(p.name for p in out.iterdir()) == [
        "CHECKSUMS.b3", "phase1", "phase2", "run.json", "summary.json", "vindex.html"]
    assert [e["expert"] for e in layer_json(tmp_path / "o", 1, 1)["experts"]] == [0, 3]
    assert verify_checksums(out) == []
    res = runner.invoke(cli_main, ["vindex", str(manifest), "--set", "vindex.experts=[8]", "--no-progress"])
    assert res.exit_code == 2 and "vindex.experts.0: expert id 8 is out of range" in res.output


def test_html_is_self_contained(phase3_run, phase1_runs):
    for out in (phase3_run.out, phase1_runs["kimi-k2.5"]):
        page = (vindex_dir(out) / "vindex.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched
        assert "Chart.js v4" in page and "chartjs-chart-matrix" in page and "sourceMappingURL" not in page
        data = re.search(r'<script id="vindex-data" type="application/json">(.*?)</script>', page, re.S).group(1)
        assert json.loads(data) == json.loads((vindex_dir(out) / "summary.json").read_text())
    assert "<canvas id=\"usage\">" in (vindex_dir(phase3_run.out) / "vindex.html").read_text()
    assert "<canvas id=\"var64\">" in (vindex_dir(phase1_runs["kimi-k2.5"]) / "vindex.html").read_text()


def test_checksums_catch_tampering(phase1_runs, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(vindex_dir(phase1_runs["hf-bf16"]), out)
    assert verify_checksums(out) == []
    target = out / "phase1" / "layer-001.json"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0x01
    target.write_bytes(bytes(raw))
    (out / "summary.json").unlink()
    (out / "extra.txt").write_text("x")
    problems = verify_checksums(out)
    assert any("layer-001.json: BLAKE3 mismatch" in p for p in problems)
    assert any("summary.json: listed in CHECKSUMS.b3 but missing" in p for p in problems)
    assert any("extra.txt: present but not listed" in p for p in problems)


def test_help_and_demo_manifest_name_the_folder_the_code_writes():
    """`vindex --help`, manifests/vindex-demo.yaml and vindex_dir all say OUTPUT.vindex/."""
    help_text = " ".join(CliRunner().invoke(cli_main, ["vindex", "--help"]).output.split())
    assert "OUTPUT.vindex/" in help_text and "OUTPUT/vindex" not in help_text
    demo = REPO / "manifests" / "vindex-demo.yaml"
    written = re.search(r"^# .*Writes (\S+)/ ", demo.read_text(), re.M).group(1)
    manifest = load_manifest(demo)
    assert (demo.parent / written).resolve() == vindex_dir(manifest.output.dir)
