"""The certification checks of verify (the seed note's "adversarial certification"), on the bundle's
JSON files only, so the note can state their results when it is written and verify can re-run them:

* ``synthetic-audit``: the class of the weights behind the tokens. **X0** when the checkpoint is
  named by content (``checkpoint.content_root``, from a ``kimi-jax digest`` file checked during the
  run), is not a ``synth`` preset, and nothing in the bundle is recognisably made up by kimi-jax
  (its synthetic presets' configs, its synthetic tokenizer); otherwise **X1** with every reason.
  X1 is a class, not a failure: the check fails only when the records contradict each other (a
  manifest naming a preset whose config is not the one the ledger records). X0 cannot prove that
  weights are trained: random weights written elsewhere and digested would pass; the content root
  is what to compare with a published one.
* ``explorer-scope``: ``explorer.html`` shows nothing that is not in the ledger: its one data block
  is ``ledger.json`` itself, it loads nothing (the Content-Security-Policy forbids every fetch, and
  no element names an outside resource), and holds no other data.
* ``runtime-contract``: the execution properties the note states (storage, KV cache or full
  recompute, residency budget, page cache, speculation, matmul path, mesh, platform) are what the
  run recorded, each checked against the evidence: the manifest, the environment record, and the
  per-step and per-layer counters.
* ``ratification-scope``: a matched anchor ratifies step 0's anchored fields under the conditions
  it was frozen for, nothing more; the check states that scope and fails when the anchor claims
  more than it covers. SKIPPED without an anchor (nothing is ratified).

:func:`certification_table` runs these and three checks of :mod:`kimi_jax.verify.run_checks` and
:mod:`kimi_jax.verify.ledger_checks` into the seven rows of the note's certification table.
"""

from __future__ import annotations

import functools
import html.parser
import json
from typing import Any, Callable, NamedTuple

from kimi_jax.fileio import read_regular
from kimi_jax.ledger.bundle import MAX_JSON_BYTES, TOKENIZER
from kimi_jax.platform_info import mesh_label
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import Check, CheckFailed, CheckSkipped, require, run_check, short

X0, X1 = "X0", "X1"
EXPLORER = "explorer.html"
EXPLORER_DATA_ID = "ledger-data"  # the one data block of the page (kimi_jax/assets/explorer/explorer.html)


# --- synthetic surface audit -------------------------------------------------------------------


class Audit(NamedTuple):
    verdict: str  # X0 | X1
    reasons: list[str]  # why X1 (empty for X0)
    origin: str  # one line: where the weights came from


@functools.lru_cache(maxsize=1)
def synthetic_configs() -> dict[str, str]:
    """{config digest: "preset P in layout L"} of kimi-jax's synthetic presets (any seed: the seed
    changes weights, not the config). full-shape is left out: its config is meant to be the real
    release's, so its digest cannot tell the two apart."""
    from kimi_jax.config import parse_model_config
    from kimi_jax.storage.synth import PRESETS, config_json
    from kimi_jax.settings import SYNTH_LAYOUTS

    return {parse_model_config(config_json(p, layout)).digest(): f"preset {p} in layout {layout}"
            for p in PRESETS if p != "full-shape" for layout in SYNTH_LAYOUTS}  # fmt: skip


def _synthetic_tokenizer(b: BundleView) -> str | None:
    """The vocabulary size whose synthetic tokenizer the bundle's tokenizer/ files are, byte for byte."""
    from kimi_jax.text.synthetic import tokenizer_files

    folder = b.root / TOKENIZER
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        added = json.loads(read_regular(config, MAX_JSON_BYTES, "tokenizer_config.json")).get("added_tokens_decoder")
        vocab = max(int(k) for k in added) + 1
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError, Exception):
        return None
    if not 0 < vocab <= 1 << 22:
        return None
    made = tokenizer_files(vocab)
    present = {p.name for p in folder.iterdir() if p.is_file()}
    if present and present <= set(made) and all((folder / n).read_bytes() == made[n] for n in present):
        return f"{vocab:,}-token"
    return None


def synthetic_audit(b: BundleView) -> Audit:
    """The audit's class and reasons; raises CheckFailed when the origin records contradict each other."""
    ledger, manifest = b.ledger, b.json("manifest.json")
    model = manifest.get("model") if isinstance(manifest, dict) and isinstance(manifest.get("model"), dict) else {}
    ckpt = ledger.get("checkpoint") if isinstance(ledger.get("checkpoint"), dict) else {}
    reasons, problems = [], []
    preset = model.get("synthetic") if isinstance(model.get("synthetic"), dict) else None
    known = synthetic_configs().get(ckpt.get("config_digest"))
    if preset is not None:
        p, layout, seed = preset.get("preset"), preset.get("layout", "kimi-k2.5"), preset.get("seed", 0)
        origin = f"kimi-jax synthetic checkpoint: preset {p}, layout {layout}, seed {seed} (seeded random weights)"
        reasons.append(f"manifest.json model.synthetic names the {p} preset: its weights are seeded random numbers "
                       f"(layout {layout}, seed {seed})")  # fmt: skip
        if p != "full-shape" and known != f"preset {p} in layout {layout}":
            problems.append(f"manifest.json model.synthetic is preset {p} in layout {layout}, but ledger.json "
                            f"checkpoint.config_digest {short(ckpt.get('config_digest'))} is not that preset's "
                            "config")  # fmt: skip
    else:
        where = ckpt.get("path")
        origin = f"checkpoint {where} ({ckpt.get('storage', 'local')})"
        if known is not None:
            reasons.append(f"ledger.json checkpoint.config_digest is the config of kimi-jax's synthetic {known} "
                           "(a checkpoint written by `kimi-jax synth`)")  # fmt: skip
    if not ckpt.get("content_root"):
        reasons.append("ledger.json checkpoint.content_root is null: no digest file was checked during the run, so "
                       "the weights are not named by content")  # fmt: skip
    else:
        origin += f", content root {ckpt['content_root']}"
    vocab = _synthetic_tokenizer(b)
    if vocab is not None:
        reasons.append(f"{TOKENIZER}/ is kimi-jax's synthetic {vocab} tokenizer, byte for byte (made up, not "
                       "trained)")  # fmt: skip
    require(problems)
    return Audit(X1 if reasons else X0, reasons, origin)


def check_synthetic_audit(b: BundleView) -> str:
    audit = synthetic_audit(b)
    if audit.verdict == X0:
        return f"{X0}: {audit.origin}; no synthetic preset, config or tokenizer"
    return f"{X1}: " + "; ".join(audit.reasons)


# --- explorer scope ----------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    """What a page could show or load besides its inline code: JSON data blocks, elements that
    name a resource, and its Content-Security-Policy."""

    RESOURCE_ATTRS = ("src", "href", "data", "action", "srcset", "poster", "formaction", "background", "ping")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str | None, list[str]]] = []
        self.resources: list[str] = []
        self.csp: list[str] = []
        self.scripts_with_src = 0
        self._in_block = False

    def handle_starttag(self, tag: str, attrs) -> None:
        a = {k.lower(): (v or "") for k, v in attrs}
        if tag == "meta" and a.get("http-equiv", "").lower() == "content-security-policy":
            self.csp.append(a.get("content", ""))
        for name in self.RESOURCE_ATTRS:
            if name in a and not (name == "href" and tag == "a" and _local_link(a[name])):
                self.resources.append(f"<{tag} {name}={short(a[name], 60)}>")
        if tag in ("link", "iframe", "object", "embed", "base", "frame"):
            self.resources.append(f"<{tag}>")
        if tag == "script":
            kind = a.get("type", "").split(";")[0].strip().lower()
            if kind == "application/json" or kind.endswith("+json"):
                self.blocks.append((a.get("id"), []))
                self._in_block = True

    def handle_data(self, data: str) -> None:
        if self._in_block:
            self.blocks[-1][1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_block = False


def _local_link(href: str) -> bool:
    """A link within the page, or to the bundle's own note, which the page offers to open."""
    return href == "note.pdf" or (href.startswith("#") and "/" not in href)


def check_explorer_scope(b: BundleView) -> str:
    if not b.has(EXPLORER):
        raise CheckSkipped(f"the bundle has no {EXPLORER}")
    try:
        text = read_regular(b.root / EXPLORER, 2 * MAX_JSON_BYTES, EXPLORER).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckFailed(f"{EXPLORER}: not UTF-8 ({e})") from None
    page = _Page()
    page.feed(text)
    page.close()
    problems = []
    policies = [p.replace(" ", "") for p in page.csp]
    if not policies or not all("default-src'none'" in p for p in policies):
        problems.append(f"{EXPLORER}: its Content-Security-Policy does not forbid fetching (expected default-src "
                        "'none')")  # fmt: skip
    problems += [f"{EXPLORER}: names an outside resource {r}" for r in page.resources]
    ids = [i for i, _ in page.blocks]
    if ids != [EXPLORER_DATA_ID]:
        problems.append(f"{EXPLORER}: data blocks {ids}; expected exactly one, #{EXPLORER_DATA_ID} (the ledger)")
    for block_id, parts in page.blocks:
        if block_id == EXPLORER_DATA_ID:
            try:
                shown = json.loads("".join(parts))
            except ValueError as e:
                problems.append(f"{EXPLORER}: #{EXPLORER_DATA_ID} is not JSON ({e})")
                continue
            if shown != b.json("ledger.json"):  # the whole ledger, whichever sequence a check looks at
                problems.append(f"{EXPLORER}: #{EXPLORER_DATA_ID} is not ledger.json: the page would show values the "
                                "ledger does not hold")  # fmt: skip
    require(problems)
    return "the page embeds ledger.json and nothing else, and loads nothing"


# --- runtime contract --------------------------------------------------------------------------


def _manifest(b: BundleView):
    from kimi_jax.errors import ManifestError
    from kimi_jax.manifest import load_recorded_manifest

    try:
        return load_recorded_manifest(b.root / "manifest.json")
    except ManifestError as e:
        raise CheckFailed(b.relative(str(e)).splitlines()[0]) from None


def _counter(steps: list[dict], field: str, layers: bool = False) -> int:
    if layers:
        return sum(int(layer.get(field) or 0) for s in steps for layer in s.get("layers") or [])
    return sum(int(s.get(field) or 0) for s in steps)


def runtime_contract(b: BundleView) -> tuple[list[str], list[str]]:
    """(the execution properties the evidence confirms, the problems found)."""
    m, ledger, steps = _manifest(b), b.ledger, b.steps()
    run, ckpt = ledger.get("run") or {}, ledger.get("checkpoint") or {}
    residency = run.get("residency") or {}
    held, problems = [], []
    # storage: the manifest's checkpoint names the kind the ledger records
    location = m.model.checkpoint
    want = str(location).split("://", 1)[0] if location is not None and "://" in str(location) else "local"
    if ckpt.get("storage") != want:
        problems.append(f"ledger.json checkpoint.storage is {short(ckpt.get('storage'))}, but manifest.json's "
                        f"checkpoint is read as {want}")  # fmt: skip
    elif want == "local" and _counter(steps, "bytes_network"):
        problems.append("ledger.json records bytes from the network for a local checkpoint")
    else:
        held.append(f"storage {want}")
    # KV cache or full recompute: the positions routed at every MoE layer of every step
    kv = run.get("kv_cache")
    if kv != m.generate.kv_cache:
        problems.append(f"ledger.json run.kv_cache is {short(kv)}, manifest.json generate.kv_cache {m.generate.kv_cache}")
    elif "routing" in (run.get("capture") or []):
        for s in steps:
            want_positions = len(s.get("context") or []) if (not kv or s.get("index") == 0) else 1
            bad = [(layer.get("layer"), len(layer.get("experts") or [])) for layer in s.get("layers") or []
                   if layer.get("kind") == "moe" and len(layer.get("experts") or []) != want_positions]  # fmt: skip
            if bad:
                how = "a KV-cache decode step routes 1 position" if kv and s.get("index") else \
                    f"a full recompute routes the whole context ({want_positions} positions)"  # fmt: skip
                problems.append(f"steps[{s.get('index')}].layers[{bad[0][0]}] routed {bad[0][1]} position(s), but "
                                f"{how} (kv_cache {kv})")  # fmt: skip
                break
        else:
            held.append("KV cache (routing of 1 position per decoded step)" if kv else
                        "full recompute (every step routes its whole context)")  # fmt: skip
    # residency budget: what a budget of 0 keeps is nothing
    budget = residency.get("budget_bytes")
    asked = m.storage.resident_bytes
    if isinstance(asked, int) and budget != asked:
        problems.append(f"ledger.json run.residency.budget_bytes is {short(budget)}, manifest.json "
                        f"storage.resident_bytes {asked}")  # fmt: skip
    elif budget == 0 and run.get("mesh") is None:
        kept = _counter(steps, "bytes_from_memory")
        if kept or residency.get("resident_layers") or residency.get("head_resident"):
            problems.append(f"a budget of 0 keeps nothing, but the ledger records {kept:,} bytes from memory "
                            f"and {residency.get('resident_layers')} resident layer(s)")  # fmt: skip
        else:
            held.append("budget 0: nothing kept across steps")
    else:
        held.append(f"budget {budget:,} bytes" if isinstance(budget, int) else "budget recorded")
    # speculation off: nothing read for a prediction
    predicted = _counter(steps, "bytes_from_speculation") + _counter(steps, "bytes_mispredicted")
    if residency.get("speculate") != m.storage.speculate:
        problems.append(f"ledger.json run.residency.speculate is {short(residency.get('speculate'))}, manifest.json "
                        f"storage.speculate {m.storage.speculate}")  # fmt: skip
    elif not m.storage.speculate and (predicted or _counter(steps, "experts_predicted", layers=True)):
        problems.append(f"speculation is off, but the ledger records {predicted:,} bytes read for predictions")
    else:
        held.append("speculation " + ("on" if m.storage.speculate else "off"))
    # page cache: the policy asked, the eviction, the residency recorded
    mode, asked_mode = residency.get("page_cache"), m.storage.page_cache
    resident, shards = run.get("page_cache_resident_bytes"), run.get("shard_bytes")
    if asked_mode in ("keep", "drop") and mode != asked_mode:
        problems.append(f"ledger.json run.residency.page_cache is {short(mode)}, manifest.json storage.page_cache "
                        f"{asked_mode}")  # fmt: skip
    elif run.get("page_cache_evicted") and not m.storage.evict_page_cache:
        problems.append("ledger.json run.page_cache_evicted is true, but manifest.json storage.evict_page_cache is false")
    elif isinstance(resident, int) and isinstance(shards, int) and resident > shards:
        problems.append(f"ledger.json run.page_cache_resident_bytes {resident:,} exceeds shard_bytes {shards:,}")
    else:
        held.append(f"page cache {mode}")
    # matmul path and mesh
    if run.get("matmul", "widened") != m.compute.matmul:
        problems.append(f"ledger.json run.matmul is {short(run.get('matmul'))}, manifest.json compute.matmul "
                        f"{m.compute.matmul}")  # fmt: skip
    else:
        held.append(f"matmul {m.compute.matmul}")
    mesh, asked_mesh = run.get("mesh"), m.compute.mesh
    shape = None if asked_mesh is None else (asked_mesh.expert, asked_mesh.model, asked_mesh.placement)
    if (None if not isinstance(mesh, dict) else (mesh.get("expert"), mesh.get("model"), mesh.get("placement"))) != shape:
        problems.append(f"ledger.json run.mesh is {short(mesh)}, manifest.json compute.mesh {short(shape)}")
    else:
        processes = mesh.get("process_count", 1) if isinstance(mesh, dict) else 1
        odd = [s.get("index") for s in steps if len(s.get("bytes_per_process") or [0]) != processes]
        if odd:
            problems.append(f"steps {odd[:4]}: bytes_per_process does not hold one count per process ({processes})")
        else:
            held.append("one device" if mesh is None else f"mesh {shape[0]}x{shape[1]} {shape[2]}, "
                        f"{processes} process(es)")  # fmt: skip
    # platform: the ledger's is the environment record's; the environment record is taken without the
    # mesh and the kernels, which a run's ledger adds (mesh label and process count, the kernels that
    # multiplied) and run.mesh and run.kernels state
    platform = ledger.get("platform") if isinstance(ledger.get("platform"), dict) else {}
    on_mesh = {k: platform[k] for k in ("mesh", "process_count") if k in platform}
    kernels = run.get("kernels") if isinstance(run.get("kernels"), dict) else {}
    ran = f"{kernels.get('kernel_set')} {kernels.get('isa')}" if kernels.get("kernel_set") else None
    if isinstance(mesh, dict) and on_mesh != {"mesh": mesh_label(mesh.get("expert"), mesh.get("model"), mesh.get("placement")),
                                              "process_count": mesh.get("process_count")}:  # fmt: skip
        problems.append(f"ledger.json platform names mesh {short(on_mesh)}, run.mesh is {short(mesh)}")
    elif platform.get("kernels") != ran:
        problems.append(f"ledger.json platform names kernels {short(platform.get('kernels'))}, run.kernels says "
                        f"{short(ran)} ran")  # fmt: skip
    elif b.has("environment.json"):
        env = b.json("environment.json")
        rest = {k: v for k, v in platform.items() if k not in on_mesh and k != "kernels"}
        if not isinstance(env, dict) or env.get("platform") != rest:
            problems.append("environment.json platform differs from ledger.json platform")
        else:
            held.append(f"platform {platform.get('backend')}")
    return held, problems


def check_runtime_contract(b: BundleView) -> str:
    held, problems = runtime_contract(b)
    require(problems)
    return "; ".join(held)


# --- ratification scope ------------------------------------------------------------------------


def ratification_scope(b: BundleView) -> str:
    """What the anchor ratifies, as one sentence; raises CheckSkipped without an anchor and
    CheckFailed when the anchor claims more than it covers."""
    from kimi_jax.ledger.anchor_record import ANCHORED

    ledger = b.ledger
    record = ledger.get("anchor")
    if record is None and not b.has("anchor.json"):
        raise CheckSkipped("the bundle carries no anchor: nothing is ratified (the note says Unratified)")
    if not isinstance(record, dict) or not b.has("anchor.json"):
        raise CheckFailed("ledger.json anchor and anchor.json must both be present for a ratified run")
    anchor = b.json("anchor.json")
    if not isinstance(anchor, dict):
        raise CheckFailed("anchor.json: expected a JSON object")
    steps = b.steps()
    problems = [f"anchor.json: {f}: missing; the ratification covers only the fields the anchor froze"
                for f in ANCHORED if f not in anchor]  # fmt: skip
    if not steps or anchor.get("prompt") != steps[0].get("context"):
        problems.append(f"anchor.json prompt {short(anchor.get('prompt'))} is not step 0's context: the anchor "
                        "ratifies step 0 of its own prompt only")  # fmt: skip
    if record.get("status") != "matched":
        problems.append(f"ledger.json anchor.status is {short(record.get('status'))}; only a matched anchor ratifies")
    require(problems)
    frozen = anchor.get("checkpoint") if isinstance(anchor.get("checkpoint"), dict) else {}
    named = "by content root" if frozen.get("content_root") else "by layout, config and tensor list (not by content)"
    same = anchor.get("platform_digest") == ledger.get("platform_digest")
    return (f"step 0 only ({', '.join(ANCHORED)}), checkpoint named {named}, prompt of {len(anchor['prompt'])} "
            f"token(s), {anchor.get('dtype')}/{anchor.get('dequant')}, kv_cache {anchor.get('kv_cache')}; frozen on "
            f"{'this' if same else 'another'} platform; steps 1-{max(len(steps) - 1, 1)} and derived fields are "
            "not ratified")  # fmt: skip


def check_ratification_scope(b: BundleView) -> str:
    return ratification_scope(b)


CERTIFICATION_CHECKS: tuple[tuple[str, Callable[[BundleView], str]], ...] = (
    ("synthetic-audit", check_synthetic_audit),
    ("explorer-scope", check_explorer_scope),
    ("runtime-contract", check_runtime_contract),
    ("ratification-scope", check_ratification_scope),
)


class Row(NamedTuple):
    label: str  # the seed note's wording
    check: Check  # verify's outcome of the check behind it (number 0: numbered by verify's list)
    result: str  # the short result shown in the table


def certification_table(b: BundleView) -> list[Row]:
    """The seven rows of the note's certification table, in the seed's order."""
    from kimi_jax.verify.ledger_checks import check_provenance
    from kimi_jax.verify.run_checks import check_anchor, check_continuity

    def row(label: str, name: str, fn: Callable[[BundleView], str], ok: str) -> Row:
        check = run_check(0, name, fn, b)
        if check.status == "OK":
            result = ok
        elif check.status == "SKIPPED":
            result = "Not applicable"
        else:
            result = "FAILED"
        return Row(label, check, result)

    audit_result = "X0 (clean)" if _audit_class(b) == X0 else "X1 (synthetic)"
    layers = sum(len(s.get("layers") or []) for s in b.steps())
    return [
        row("Anchor continuity (step 0 = frozen anchor)", "anchor", check_anchor, "Verified"),
        row("Cross-token input sequences", "continuity", check_continuity, "Verified"),
        row("Synthetic surface audit", "synthetic-audit", check_synthetic_audit, audit_result),
        row(f"Provenance labels ({layers} layer entries)", "provenance", check_provenance, "All correct"),
        row("Explorer scope", "explorer-scope", check_explorer_scope, "No inflation"),
        row("Runtime contract", "runtime-contract", check_runtime_contract, "Stated honestly"),
        row("Ratification scope", "ratification-scope", check_ratification_scope, "Scoped to step 0"),
    ]


def _audit_class(b: BundleView) -> str | None:
    try:
        return synthetic_audit(b).verdict
    except CheckFailed:
        return None


def certification_record(rows: list[Row]) -> dict[str, Any]:
    """``certification.json``: the table as data, for the explorer's verify view."""
    return {"certification_version": 1,
            "rows": [{"label": r.label, "check": r.check.name, "status": r.check.status, "result": r.result,
                      "detail": r.check.reason} for r in rows]}  # fmt: skip
