"""What the note says, in the seed note's order, generated from the bundle's files.

Every sentence that states a fact about the run is built from a recorded value (the ledger, the
resolved manifest, the anchor, the environment record, the stored arrays' declared shapes, verify's
certification checks); the few fixed sentences say what kind of record the bundle is. Nothing here
imports JAX or reads the model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kimi_jax.ledger.bundle import check_array_declarations
from kimi_jax.manifest import recorded_manifest
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.certification import (
    X0,
    X1,
    Audit,
    certification_table,
    ratification_scope,
    runtime_contract,
    synthetic_audit,
)
from kimi_jax.verify.report import CheckFailed, CheckSkipped

GIB = 1024**3


class Heading(NamedTuple):
    text: str


class Para(NamedTuple):
    text: str
    style: str = ""  # "" | "B" (bold) | "I" (italic) | "mono"


class Bullets(NamedTuple):
    items: list[str]


class Table(NamedTuple):
    caption: str
    header: list[str]
    rows: list[list[str]]
    widths: list[float]  # relative column widths
    mono: tuple[int, ...] = ()  # columns set in the monospaced font


class Chart(NamedTuple):
    caption: str
    kind: str  # "lines" | "bars"
    series: list[tuple[str, list[float]]]  # (label, one value per layer)
    y_label: str


class Badge(NamedTuple):
    text: str


Block = Heading | Para | Bullets | Table | Chart | Badge


class Note(NamedTuple):
    title: str
    subtitle: str
    badge: str
    blocks: list[Block]


def nbytes(n: int) -> str:
    """A byte count exactly, and in GiB or MiB beside it."""
    if n >= GIB:
        return f"{n:,} ({n / GIB:.1f} GiB)"
    return f"{n:,} ({n / 1024**2:.1f} MiB)"


def model_name(layout: str) -> str:
    names = {"kimi-k2.5-int4": "Kimi K2.5 layout (int4 routed experts)", "kimi-k2.5": "Kimi K2.5 layout",
             "deepseek-v3-fp8": "DeepSeek-V3 / Kimi K2 layout (block FP8)", "kimi-k2-int4": "Kimi K2 layout (int4)",
             "hf-bf16": "transformers layout (BF16)", "hf-f32": "transformers layout (F32)"}  # fmt: skip
    return names.get(layout, f"{layout} layout")


STORAGE = {"local": "a local path", "http": "an HTTP server", "https": "an HTTPS server", "hf": "a Hugging Face Hub "
           "repository", "s3": "an S3 bucket"}  # fmt: skip


class Facts:
    """The bundle's facts the note is written from, each read once."""

    def __init__(self, b: BundleView) -> None:
        self.b = b
        self.ledger = b.ledger
        self.manifest = recorded_manifest(b.json("manifest.json"))  # what each field meant when it ran
        self.steps = b.steps()
        self.run = self.ledger.get("run") or {}
        self.ckpt = self.ledger.get("checkpoint") or {}
        self.platform = self.ledger.get("platform") or {}
        self.residency = self.run.get("residency") or {}
        try:
            self.audit = synthetic_audit(b)
        except CheckFailed as e:  # the note states it; verify's synthetic-audit check fails on it
            self.audit = Audit(X1, [f"the origin records contradict each other: {e}"], "origin records inconsistent")
        try:
            self.contract_held, self.contract_problems = runtime_contract(b)
        except CheckFailed as e:
            self.contract_held, self.contract_problems = [], [str(e)]
        self.anchor = b.json("anchor.json") if b.has("anchor.json") else None
        try:
            self.ratified: str | None = ratification_scope(b)
        except (CheckSkipped, CheckFailed):
            self.ratified = None
        self.proof = self.ledger.get("non_perturbation")
        self.layers = self.steps[0].get("layers") or []
        self.hidden, self.vocab = self._array_lengths()
        self.capture = self.run.get("capture") or []
        parent = getattr(b, "parent", None)  # a multi-sequence bundle: the note describes its sequence 0
        self.sequences_words = "" if parent is None else (
            f" The run has {len(parent.ledger['sequences'])} sequences, decoded together in "
            f"{len(parent.ledger['passes'])} passes over the weights (ledger version {parent.ledger['ledger_version']}); "
            "this note describes sequence 0, the anchor's, and kimi-jax verify checks every sequence.")  # fmt: skip

    def _array_lengths(self) -> tuple[int | None, int | None]:
        try:
            stores = check_array_declarations(self.b.root / "arrays", [s.get("index") for s in self.steps])
        except Exception:  # noqa: BLE001 - a damaged tree: verify's digests check says why
            return None, None
        lengths = {what: int(store.shape[0]) for (_, what), store in stores.items()}
        return lengths.get("hidden"), lengths.get("logits")

    @property
    def synthetic(self) -> dict | None:
        model = self.manifest.get("model") if isinstance(self.manifest, dict) else None
        return model.get("synthetic") if isinstance(model, dict) else None

    @property
    def moe_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.get("kind") == "moe")

    @property
    def top_k(self) -> int | None:
        for layer in self.layers:
            if layer.get("experts"):
                return len(layer["experts"][0])
        return None

    @property
    def model(self) -> str:
        if self.synthetic:
            s = self.synthetic
            return f"the synthetic {s.get('preset')} model ({model_name(self.ckpt.get('layout', ''))}, seed {s.get('seed', 0)})"
        return f"the checkpoint at {self.ckpt.get('path')} ({model_name(self.ckpt.get('layout', ''))})"

    @property
    def storage(self) -> str:
        kind = self.ckpt.get("storage", "local")
        where = STORAGE.get(kind, kind)
        if kind == "local":
            return f"{where} (the bundle does not record whether it is a local disk or a network mount)"
        return where

    @property
    def badge_parts(self) -> list[tuple[str, str]]:
        backend = self.platform.get("backend", "cpu")
        compute = "LC" if backend == "cpu" else "LA"
        storage = {"local": "LP", "http": "HTTP", "https": "HTTP", "hf": "HF", "s3": "S3"}.get(
            self.ckpt.get("storage", "local"), "LP")  # fmt: skip
        pass_kind = "KV-cache decode" if self.run.get("kv_cache") else "no-cache full pass"
        return [
            ("M+D", "every ledger field is classified measured (M) or derived (D) by the ledger schema "
                    "(provenance.json); derived fields recompute from measured ones"),
            ("Lab", "laboratory trust tier: one run on one machine, its bundle internally consistent; kimi-jax "
                    "never assigns itself a higher tier (a replay elsewhere, kimi-jax verify --replay, is the "
                    "next step)"),
            ("Ratified" if self.ratified else "Unratified",
             "step 0 matched a frozen anchor (section 3)" if self.ratified else "the run names no matched anchor"),
            (f"{compute}+{storage}", f"{'local CPU' if compute == 'LC' else f'local {backend} accelerator'} compute "
                                     f"(backend {backend}); weights read from {STORAGE.get(self.ckpt.get('storage', 'local'), '?')}"),
            (self.audit.verdict, "synthetic surface audit: " + ("nothing recognisably synthetic; the weights are named by "
                                                                "content" if self.audit.verdict == X0 else
                                                                "synthetic; " + "; ".join(self.audit.reasons))),
            ("NP" if self.proven else "no NP", (f"capture proven non-perturbing{self.proof_scope_words} (section 4)"
                                                if self.proven else "capture not proven non-perturbing (the run "
                                                "skipped the proof)")),  # fmt: skip
            (f"{len(self.steps)} tok / {len(self.layers)} layers / {pass_kind}",
             f"{len(self.steps)} generated token(s), each through all {len(self.layers)} layers; "
             + ("each step after the first computes one position from the KV cache" if self.run.get("kv_cache")
                else "every step recomputes the whole sequence (no KV cache)")),
        ]  # fmt: skip

    @property
    def badge(self) -> str:
        return " · ".join(part for part, _ in self.badge_parts) + " · Output formation ledger"

    @property
    def proven(self) -> bool:
        return isinstance(self.proof, dict) and self.proof.get("identical") is True

    @property
    def proof_scope_words(self) -> str:
        """'' for a proof of every step (scope all, or a ledger from before scopes), else which step it covers."""
        first = isinstance(self.proof, dict) and self.proof.get("scope") == "first" and len(self.steps) > 1
        return " on step 0, the anchor step" if first else ""

    @property
    def total_bytes(self) -> int:
        return sum(int(s.get("bytes_read") or 0) for s in self.steps)

    @property
    def total_wall(self) -> float:
        return sum(float(s.get("wall_s") or 0) for s in self.steps)


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def token_label(step: dict[str, Any], escape) -> str:
    """ID 'text' with the text escaped for print (the id alone when the ledger has no text)."""
    text = step.get("token_text")
    return f"{step.get('token')}" + ("" if text is None else f" '{escape(text)}'")


def claim(f: Facts) -> list[Block]:
    n, layers = len(f.steps), len(f.layers)
    weights = ("seeded random weights: the claim is about the machinery (streaming, capture, proof), not about a "
               "trained model's output" if f.synthetic else
               f"the weights behind every token are named by content root {f.ckpt['content_root']}"
               if f.ckpt.get("content_root") else
               "the weights are named by layout, config and tensor list, not by content (no digest file was "
               "checked)")  # fmt: skip
    pass_kind = ("each step after the first decoding one position from the KV cache" if f.run.get("kv_cache") else
                 "every step recomputing the whole sequence")  # fmt: skip
    return [Heading("1. Claim"), Para(
        f"{upper_first(f.model)} completes a streamed inference pass on one machine: {n} token(s) generated, each "
        f"through all {layers} layers, {pass_kind}, with weights read from {f.storage}. Its output formation is "
        f"exposed through a token-by-token ledger of {n * layers} layer observations under an explicit provenance "
        f"and execution contract; {weights}."),
        Para("This is not a benchmark and not a claim about reasoning: the ledger records output formation "
             "mechanics (which experts were selected, how residual norms evolved, what the logits were), not why "
             "the model produced its output.")]  # fmt: skip


def contract(f: Facts) -> list[Block]:
    def dim(value: int | None, source: str) -> str:
        return "not recorded" if value is None else f"{value:,} ({source})"

    dense = len(f.layers) - f.moe_layers
    distinct = sorted({e for s in f.steps for layer in s.get("layers") or [] for pos in layer.get("experts") or []
                       for e in pos})  # fmt: skip
    tok = f.ckpt.get("tokenizer") or {}
    rows = [["Layout", model_name(f.ckpt.get("layout", "?"))],
            ["Layers", f"{len(f.layers)} ({dense} dense + {f.moe_layers} MoE)"],
            ["Hidden dimension", dim(f.hidden, "stored hidden state")],
            ["Vocabulary", dim(f.vocab, "stored logits")],
            ["Routing", "not captured" if f.top_k is None else f"top-{f.top_k} routed experts per token; "
                                                               f"{len(distinct)} distinct experts used in this run"],
            ["Compute", f"{f.run.get('dtype')}, dequant {f.run.get('dequant')}, matmul {f.run.get('matmul', 'widened')}"],
            ["Tokenizer", f"{tok.get('kind')} ({len(tok.get('files') or {})} files)" if tok else "none shipped"],
            ["Checkpoint", f"{f.ckpt.get('path')}"],
            ["Shard bytes", nbytes(int(f.run.get("shard_bytes") or 0))],
            ["Config digest", f.ckpt.get("config_digest", "")],
            ["Tensor list digest", f.ckpt.get("tensor_list_digest", "")],
            ["Content root", f.ckpt.get("content_root") or "not recorded"]]  # fmt: skip
    p = f.platform
    mesh = f.run.get("mesh")
    compute = (f"{'Local CPU' if p.get('backend') == 'cpu' else 'Local ' + str(p.get('backend'))} compute: "
               f"{p.get('device_count')} {p.get('device_kind')} device(s); {p.get('cpu_model')}, {p.get('cpu_count')} "
               f"cores, {p.get('os')}; " + ("one device, no mesh." if not isinstance(mesh, dict) else
               f"mesh {mesh.get('expert')}x{mesh.get('model')} {mesh.get('placement')} over "
               f"{mesh.get('process_count')} process(es)."))  # fmt: skip
    budget = int(f.residency.get("budget_bytes") or 0)
    kept = ("Weights streamed per layer; nothing is kept across steps (residency budget 0)." if budget == 0 else
            f"Residency budget {nbytes(budget)}: {f.residency.get('resident_layers')} layer base(s) resident, head "
            f"{'resident' if f.residency.get('head_resident') else 'streamed'}, expert cache "
            f"{nbytes(int(f.residency.get('expert_cache_bytes') or 0))} ({f.residency.get('expert_cache')}).")  # fmt: skip
    top = f" Only the {f.top_k} experts the router picks per token are read at each MoE layer." if f.top_k else ""
    per_step = [int(s.get("bytes_read") or 0) for s in f.steps]
    shards = int(f.run.get("shard_bytes") or 0)
    share = f" ({min(per_step) / shards:.0%} to {max(per_step) / shards:.0%} of the checkpoint's shard bytes)" if shards else ""
    resident, evicted = int(f.run.get("page_cache_resident_bytes") or 0), f.run.get("page_cache_evicted")
    props = [compute, f"Weights read from {f.storage}: {f.ckpt.get('path')}.", kept + top,
             "No application-level KV cache: the full sequence is recomputed at every step." if not f.run.get("kv_cache")
             else "KV cache of the MLA latent: step 0 computes the prompt, each later step one position.",
             f"Bytes used per step: {nbytes(min(per_step))} to {nbytes(max(per_step))}{share}.",
             f"OS page cache: {resident:,} of {shards:,} shard bytes resident when the run started"
             f"{', after evicting them' if evicted else ''}; ranges {'dropped from' if f.residency.get('page_cache') == 'drop' else 'kept in'} "
             "the page cache once read. Explicitly declared, not hidden.",
             "Speculative expert reads " + ("on." if f.residency.get("speculate") else "off."),
             "Every tensor read was checked against the digest file "
             f"{f.ckpt.get('digest_file')}." if f.ckpt.get("content_root") else
             "No digest file was checked: the bytes read are not compared with published digests."]  # fmt: skip
    checked = ("The runtime contract check (verify) confirmed each of these against what the run recorded: "
               + "; ".join(f.contract_held) + "." if not f.contract_problems else
               "The runtime contract check found the record inconsistent: " + "; ".join(f.contract_problems) + ".")
    return [Heading("2. Contract"), Table("Table 1. Model summary (from the bundle's records).", ["Property", "Value"],
                                          rows, [0.28, 0.72], mono=()),
            Para("Execution properties.", "B"), Bullets(props), Para(checked),
            Para("Trust tier. The execution surface is at laboratory trust tier (badge: Lab). Ratification applies "
                 "to what a frozen anchor covers, not to every derived field in the ledger.")]  # fmt: skip


def anchor_section(f: Facts, escape) -> list[Block]:
    s0 = f.steps[0]
    if f.anchor is not None and f.ratified:
        a = f.anchor
        intro = (f"The execution surface is anchored by a single-step proof: the prompt of {len(a.get('prompt') or [])} "
                 f"token(s) in, all {len(f.layers)} layers traversed, the output out. kimi-jax anchor freeze ran "
                 "this twice and wrote the anchor only because both runs agreed bit for bit; this run's step 0 "
                 "matched it exactly.")  # fmt: skip
        rows = [["Output token", str(a.get("token"))], ["Output logit", repr(a.get("logit"))],
                ["Bytes loaded", f"{a.get('bytes_read'):,}"], ["Hidden digest", a.get("hidden_digest")],
                ["Logits digest", a.get("logits_digest")], ["Scope", f.ratified]]  # fmt: skip
        caption = "Table 2. Frozen single-step anchor (anchor.json)."
    else:
        intro = ("This run names no anchor, so nothing is ratified. Step 0's values are below as recorded; "
                 "kimi-jax anchor freeze on the same manifest would freeze them (two runs, bitwise identical) "
                 "for later runs to match.")  # fmt: skip
        rows = [["Output token", token_label(s0, escape)], ["Output logit", repr(s0.get("logit"))],
                ["Bytes loaded", f"{s0.get('bytes_read'):,}"], ["Hidden digest", s0.get("hidden_digest")],
                ["Logits digest", s0.get("logits_digest")]]  # fmt: skip
        caption = "Table 2. Step 0 (not frozen)."
    return [Heading("3. Frozen Anchor and Determinism"), Para(intro),
            Table(caption, ["Anchor", "Value"], rows, [0.22, 0.78], mono=(1,)),
            Para("Digests are BLAKE3 of the float32 little-endian bytes: the hidden state at the last position after "
                 "the last layer, and the last position's logits. The output logit is covered by the logits digest.")]


def perturbation(f: Facts) -> list[Block]:
    head = Heading("4. Non-Perturbing Capture")
    if not f.proven:
        return [head, Para("Not proven: this run skipped the bare run (--no-prove), so the ledger's capture is "
                           "not shown to leave the computation unchanged.")]  # fmt: skip
    fields = ", ".join(f.proof.get("compared") or [])
    rows = [[str(b.get("step")), str(b.get("token")), b.get("hidden_digest", "")[:16] + "…",
             b.get("logits_digest", "")[:16] + "…", f"{b.get('bytes_read'):,}", "identical"]
            for b in f.proof.get("bare") or []]  # fmt: skip
    covered = (f"on step 0, the anchor step, of the {len(f.steps)} steps (the proof's scope first; kimi-jax prove "
               "runs every step bare)" if f.proof_scope_words else f"at every one of the {len(rows)} steps")  # fmt: skip
    return [head, Para(f"The ledger's per-layer measurements are an auxiliary output of the same compiled programs. "
                       f"The run executed a bare run (capture off) and the instrumented run and compared {fields} "
                       f"{covered}: all identical, so the ledger was written. Had any value "
                       "differed, no ledger would exist."),
            Table("Bare run vs instrumented run (non_perturbation.json).", ["Step", "Token", "Hidden digest",
                  "Logits digest", "Bytes", "Result"], rows, [0.08, 0.12, 0.24, 0.24, 0.18, 0.14], mono=(2, 3))]


def classification(f: Facts) -> list[Block]:
    labels = f.b.json("provenance.json") if f.b.has("provenance.json") else {}
    labels = labels if isinstance(labels, dict) else {}
    def picked(kind: str, layer: bool) -> str:
        prefix = "steps[].layers[]." if layer else "steps[]."
        names = sorted(k.removeprefix(prefix) for k, v in labels.items() if v == kind and k.startswith(prefix)
                       and (layer or not k.startswith("steps[].layers[].")))  # fmt: skip
        return ("per layer: " if layer else "per step: ") + (", ".join(names) or "none")

    return [Heading("5. Output Formation Ledger"),
            Para(f"Each generated token has a ledger entry with {len(f.layers)} layer observations. Every field is "
                 "classified by the ledger schema's x-provenance (provenance.json), not by runtime annotation:"),
            Para("Measured (M), direct from execution:", "B"), Para(picked("measured", False), "mono"),
            Para(picked("measured", True), "mono"),
            Para("Derived (D), computed deterministically from measured values:", "B"),
            Para(picked("derived", False), "mono"), Para(picked("derived", True), "mono"),
            Para("verify recomputes every derived field from the measured values and the stored arrays.")]


def steps_section(f: Facts, escape) -> list[Block]:
    rows = [[str(s.get("index")), str(len(s.get("context") or [])), token_label(s, escape), repr(s.get("logit")),
             f"{s.get('bytes_read'):,}", f"{float(s.get('wall_s') or 0):.3f}"] for s in f.steps]  # fmt: skip
    walls = [float(s.get("wall_s") or 0) for s in f.steps]
    grow = ("Per-step bytes grow because longer contexts activate more distinct experts."
            if not f.run.get("kv_cache") and len(f.steps) > 1 and f.steps[-1]["bytes_read"] > f.steps[0]["bytes_read"]
            else "")  # fmt: skip
    blocks: list[Block] = [
        Heading("6. Multi-Token Continuity"),
        Para(f"{len(f.steps)} token(s) were generated autoregressively from a prompt of {len(f.run.get('prompt') or [])} "
             f"token(s); the run stopped on {(f.ledger.get('stopped') or {}).get('reason')}."),
        Table("Table 3. Multi-token execution summary.", ["Step", "Context", "Token", "Logit", "Bytes", "Wall s"],
              rows, [0.07, 0.09, 0.36, 0.15, 0.19, 0.14], mono=(2,)),
        Para(f"Total: {nbytes(f.total_bytes)} used, {f.total_wall:.3f} s wall time. Each step's input context holds "
             f"all prior tokens. {grow} Wall times ({min(walls):.3f} s to {max(walls):.3f} s) describe one run on one "
             "machine with the page-cache state stated above; they are not throughput claims."),
    ]  # fmt: skip
    series = [(f"step {s.get('index')}", [float(layer.get("bytes_read") or 0) for layer in s.get("layers") or []])
              for s in f.steps]  # fmt: skip
    blocks.append(Chart("Figure 1. Bytes read per layer, one bar per step (ledger: steps[].layers[].bytes_read).",
                        "bars", series, "bytes"))
    return blocks


def surfaces(f: Facts) -> list[Block]:
    blocks: list[Block] = [Heading("7. Observed Structural Surfaces")]
    if "norms" in f.capture:
        series = [(f"step {s.get('index')}", [float(layer.get("norm_out") or 0) for layer in s.get("layers") or []])
                  for s in f.steps]  # fmt: skip
        blocks += [Chart("Figure 2. Residual norm after each layer (ledger: steps[].layers[].norm_out).", "lines",
                         series, "L2 norm"),
                   Para("Residual norm trajectory. The L2 norm of the residual stream after each layer, at the last "
                        "position, one line per step (measured; Figure 2). Any phases a reader sees are visual "
                        "summaries, not a segmentation the model endorses.")]  # fmt: skip
    else:
        blocks.append(Para(f"Norms were not captured (capture: {list(f.capture)}), so no trajectory is drawn."))
    if f.top_k:
        per_layer = [len({e for s in f.steps for pos in (s["layers"][i].get("experts") or []) for e in pos})
                     for i in range(len(f.layers))]  # fmt: skip
        moe = [n for n, layer in zip(per_layer, f.layers) if layer.get("kind") == "moe"]
        blocks.append(Para(f"Expert routing diversity. Each MoE layer selects {f.top_k} experts per position; over "
                           f"the run, a MoE layer used between {min(moe)} and {max(moe)} distinct experts (measured). "
                           "Routing weights are derived (normalised router scores)."))
    dense = [layer.get("layer") for layer in f.layers if layer.get("kind") == "dense"]
    if dense and f.moe_layers:
        blocks.append(Para(f"Dense-to-MoE transition. Layer(s) {', '.join(map(str, dense))} use a dense MLP, the "
                           f"other {f.moe_layers} routed experts; the boundary shows in the byte accounting above."))
    return blocks


EXPLAINED = {
    "anchor": "step 0 equals anchor.json in every anchored field, frozen for this checkpoint, prompt and mode",
    "continuity": "each step's context is the previous one plus the previous token; indices and bytes add up",
    "synthetic-audit": "X0 when the weights are named by content and nothing is a kimi-jax synthetic; else X1 "
                       "with the reasons",
    "provenance": "provenance.json is the schema's map and every ledger leaf is measured or derived",
    "explorer-scope": "explorer.html embeds ledger.json and nothing else, and loads nothing",
    "runtime-contract": "the stated execution properties match the manifest, environment record and counters",
    "ratification-scope": "the anchor ratifies step 0's anchored fields under its conditions, nothing more",
}  # fmt: skip


def verification(f: Facts, rows) -> list[Block]:
    table = [[r.label, r.result, f"{r.check.name}: {EXPLAINED[r.check.name]}"] for r in rows]
    failed = [r.label for r in rows if r.check.status == "FAILED"]
    if failed:
        verdict = f"Verdict: NOT SAFE: {', '.join(failed)} failed."
    elif f.audit.verdict == X0:
        verdict = "Verdict: SAFE: no synthetic dependencies in the artifact set."
    else:
        verdict = "Verdict: SYNTHETIC: the artifact set is consistent, and depends on synthetic inputs (X1)."
    details = [f"{r.check.name}: {r.check.status}" + (f": {r.check.reason}" if r.check.reason else "") for r in rows]
    return [Heading("8. Verification"),
            Para("Adversarial certification. The bundle's artifact set was checked by kimi-jax verify's checks, "
                 "re-run on the bundle's own files when this note was written; verify runs them again, numbered, "
                 "and re-renders this note to compare it byte for byte."),
            Table("Table 4. Adversarial certification results.", ["Check", "Result", "verify check"], table,
                  [0.3, 0.17, 0.53]),
            Para(verdict, "B"), Para("Each check's finding:", "B"), Bullets(details),
            Para("Explorer. explorer.html renders the ledger as a navigable surface (token timeline, norm chart, layer "
                 "table, routing heat map, byte accounting), every value coloured by its provenance, and has a "
                 "'verify this bundle' view that checks the bundle's files against CHECKSUMS.b3 and the receipt "
                 "in the browser, offline.")]  # fmt: skip


def boundary(f: Facts) -> list[Block]:
    prompt = f.run.get("prompt_input") or {}
    given = ("a chat rendered with the checkpoint's template" if prompt.get("chat") else
             "text encoded by the checkpoint's tokenizer" if prompt.get("text") is not None else
             f"{len(f.run.get('prompt') or [])} prompt token id(s), with no chat template")  # fmt: skip
    sampled = f.run.get("sampling")
    items = [f"That the generated token sequence is meaningful text. The output continues {given}"
             + (f", sampled with seed {sampled.get('seed')}." if sampled else ", greedily.")]
    if f.synthetic:
        items.append(f"That the weights are a trained model's: {f.synthetic.get('preset')} is a kimi-jax synthetic "
                     "preset of seeded random numbers in a real on-disk layout.")
    elif f.audit.verdict != X0:
        items.append("That the weights are a published model's: " + "; ".join(f.audit.reasons) + ".")
    else:
        items.append("That the weights are trained: the audit recognises kimi-jax's own synthetic checkpoints and "
                     "names the weights by content root; compare that root with the publisher's.")
    items += ["That the ledger captures reasoning. Norms, routing decisions and logits are execution telemetry.",
              f"Speed or throughput. {len(f.steps)} token(s) in {f.total_wall:.3f} s on {f.platform.get('cpu_model')} "
              f"({f.platform.get('backend')}) is one run under one configuration.",
              f"Generalisation of the storage contract: reads from {STORAGE.get(f.ckpt.get('storage', 'local'))} with "
              f"{int(f.run.get('page_cache_resident_bytes') or 0):,} of {int(f.run.get('shard_bytes') or 0):,} shard "
              "bytes in the page cache at the start; timing reflects that.",
              ("That every derived value is ratified. Ratification covers " + f.ratified + ".") if f.ratified else
              "That anything is ratified: no anchor was matched.",
              "That the measured values came from running the model: verify proves the bundle consistent; "
              "kimi-jax verify --replay re-runs it against the checkpoint.",
              "Semantic meaning in norm trajectory phases."]  # fmt: skip
    does = (f"What this run does establish: {f.model} executed completely through all {len(f.layers)} layers for "
            f"{len(f.steps)} token(s), and its output formation was recorded"
            + (" without altering it" if f.proven else "") + ", under a provenance contract that kimi-jax verify "
            "checks from the bundle alone.")  # fmt: skip
    return [Heading("9. Boundary"), Para("This run does not claim:"), Bullets(items), Para(does)]


def badge_section(f: Facts) -> list[Block]:
    rows = [[part, meaning] for part, meaning in f.badge_parts]
    return [Heading("Badge"), Badge(f.badge),
            Table("Each part of the badge, derived from the bundle.", ["Part", "Meaning"], rows, [0.26, 0.74])]


def build_note(b: BundleView, escape) -> Note:
    """The note's parts for the bundle at b (escape: text -> printable text)."""
    f = Facts(b)
    rows = certification_table(b)
    software = (f.ledger.get("software") or {}).get("kimi-jax", "?")
    where = (f.ckpt.get("path") or "").rstrip("/").rsplit("/", 1)[-1]
    subject = f"synthetic {f.synthetic.get('preset')} model" if f.synthetic else where
    title = f"Streamed Execution and Output Formation Ledger: {subject}"
    subtitle = (f"kimi-jax {software} technical note · ledger v{f.ledger.get('ledger_version')} · "
                f"{model_name(f.ckpt.get('layout', ''))} · {str(f.platform.get('backend', '')).upper()} + "
                f"{f.ckpt.get('storage', 'local')} storage · manifest {str(f.ledger.get('manifest_digest'))[:16]}")
    tokens = ", ".join(token_label(s, escape) for s in f.steps)
    abstract = Para(f"{upper_first(f.model)}: {len(f.layers)} layers, {len(f.steps)} token(s) generated ({tokens}), "
                    f"{len(f.steps) * len(f.layers)} layer observations, every surfaced value tagged measured or "
                    "derived. " + ("Step 0 matched a frozen anchor; " if f.ratified else "No anchor was frozen; ")
                    + ("the capture is proven non-perturbing; " if f.proven else "non-perturbation was not proven; ")
                    + f"synthetic surface audit {f.audit.verdict}." + f.sequences_words)  # fmt: skip
    blocks = [abstract, Badge(f.badge), *claim(f), *contract(f), *anchor_section(f, escape), *perturbation(f),
              *classification(f), *steps_section(f, escape), *surfaces(f), *verification(f, rows), *boundary(f),
              *badge_section(f)]  # fmt: skip
    return Note(title, subtitle, f.badge, blocks)
