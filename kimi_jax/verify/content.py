"""Checks 3-10 of verify, on what the ledger says: schema, provenance, derivations, digests,
anchor, continuity, non-perturbation, explorer. Each takes the loaded bundle and returns a note
(OK), or raises :class:`CheckFailed` / :class:`CheckSkipped` with the reason."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import blake3
import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import parse_json, read_regular
from kimi_jax.ledger.bundle import ARRAYS, MAX_JSON_BYTES, step_key
from kimi_jax.platform_info import mesh_label
from kimi_jax.storage.digests import identity_differences
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import (
    CheckFailed,
    CheckSkipped,
    join_problems,
    require,
    short,
)

EXPLORER_ELEMENT_ID = "ledger-data"
NP_FIELDS = ("token", "hidden_digest", "logits_digest", "bytes_read")


def check_schema(b: BundleView) -> str:
    import jsonschema

    from kimi_jax.ledger.ledger import LEDGER_SCHEMA, LEDGER_SCHEMA_ID, LEDGER_VERSION, LEDGER_VERSION_CHANGES

    ledger = b.json("ledger.json")
    version = ledger.get("ledger_version") if isinstance(ledger, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != LEDGER_VERSION:
        changes = "; ".join(f"version {v}: {what}" for v, what in sorted(LEDGER_VERSION_CHANGES.items()) if v > version)
        raise CheckFailed(f"ledger.json: ledger_version is {version} (schema {short(ledger.get('schema'))}), but this "
                          f"kimi-jax verifies ledger version {LEDGER_VERSION} ({LEDGER_SCHEMA_ID})"
                          + (f"; what changed since: {changes}" if changes else "")
                          + "; verify it with the kimi-jax that wrote it, or run its manifest again")  # fmt: skip
    errors = sorted(jsonschema.Draft202012Validator(LEDGER_SCHEMA).iter_errors(ledger), key=lambda e: list(e.path))
    require([f"ledger.json {e.json_path}: {e.message[:160]}" for e in errors])
    return ""


def check_provenance(b: BundleView) -> str:
    from kimi_jax.ledger.ledger import provenance_map, unclassified_fields

    stored = b.json("provenance.json")
    expected = provenance_map()
    problems = []
    if not isinstance(stored, dict):
        problems.append("provenance.json: expected an object {ledger field: measured | derived}")
    else:
        for field in sorted(set(stored) | set(expected)):
            if field not in stored:
                problems.append(f"provenance.json: {field}: missing; the schema classifies it {expected[field]}")
            elif field not in expected:
                problems.append(f"provenance.json: {field}: not a field of the ledger schema")
            elif stored[field] != expected[field]:
                problems.append(f"provenance.json: {field}: labelled {short(stored[field])}, the schema says "
                                f"{expected[field]}")  # fmt: skip
    try:
        loose = unclassified_fields(b.ledger)
    except (AttributeError, TypeError) as e:
        loose = [f"<cannot walk the ledger: {e}>"]
    problems += [f"ledger.json {field}: not classified measured or derived by the schema" for field in loose]
    require(problems)
    return ""


def _normalize(ledger: dict[str, Any]) -> bool | None:
    """The checkpoint's norm_topk_prob, when its config is available and is the one the ledger records."""
    from kimi_jax.config import load_model_config

    path = (ledger.get("checkpoint") or {}).get("path")
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        return None
    try:
        cfg = load_model_config(path)
    except Exception:
        return None
    if cfg.digest() != ledger["checkpoint"].get("config_digest"):
        return None
    return bool(cfg.norm_topk_prob)


def check_derivations(b: BundleView) -> str:
    from kimi_jax.ledger.ledger import audit_derived
    from kimi_jax.platform_info import fingerprint_digest

    ledger = b.ledger
    steps, arrays, problems = b.step_arrays()
    note = ""
    normalize = _normalize(ledger)
    if normalize is not None:
        problems += audit_derived(ledger, arrays, normalize)
    else:
        found = audit_derived(ledger, arrays, True)
        if found and not audit_derived(ledger, arrays, False):
            note = ("routing weights recompute unnormalised (norm_topk_prob false); the checkpoint config was not "
                    "available to confirm that setting")  # fmt: skip
        else:
            problems += found
    platform = ledger.get("platform")
    if isinstance(platform, dict) and fingerprint_digest(platform) != ledger.get("platform_digest"):
        problems.append(f"platform_digest is {short(ledger.get('platform_digest'))}, recomputed "
                        f"{fingerprint_digest(platform)}")  # fmt: skip
    require(problems)
    return note


def check_digests(b: BundleView) -> str:
    from kimi_jax.ledger.ledger import tensor_digest
    from kimi_jax.text.sampling import Sampling, sample_token

    steps, arrays, problems = b.step_arrays()
    recorded = (b.ledger.get("run") or {}).get("sampling")
    sampling = Sampling(**recorded) if isinstance(recorded, dict) else None
    shapes: dict[str, set] = {"logits": set(), "hidden": set()}
    for step in steps:
        i = step.get("index")
        if i not in arrays:
            continue
        logits, hidden = arrays[i]
        shapes["logits"].add(logits.shape)
        shapes["hidden"].add(hidden.shape)
        for field, a in (("hidden_digest", hidden), ("logits_digest", logits)):
            got = tensor_digest(a)
            if step.get(field) != got:
                problems.append(f"steps[{i}].{field} is {short(step.get(field))}, but {ARRAYS}/{step_key(i)} "
                                f"gives {got}")
        if logits.size == 0:
            problems.append(f"{ARRAYS}/{step_key(i)}/logits: empty")
            continue
        if sampling is None:
            chosen, rule = int(np.argmax(logits)), "argmax of the stored logits"
        else:
            chosen, rule = sample_token(logits, sampling, i)[0], f"the seeded draw from the stored logits (seed {sampling.seed})"
        if step.get("token") != chosen:
            problems.append(f"steps[{i}].token is {short(step.get('token'))}, but the {rule} is {chosen}")
        token = step.get("token")
        if isinstance(token, int) and 0 <= token < logits.size:
            logit = step.get("logit")
            if not isinstance(logit, (int, float)) or np.float32(logit) != logits[token]:
                problems.append(f"steps[{i}].logit is {short(logit)}, but the stored logits[{token}] is "
                                f"{float(logits[token])!r} (float32)")  # fmt: skip
        else:
            problems.append(f"steps[{i}].token {short(token)} is not an index into the stored logits "
                            f"(vocab {logits.size})")  # fmt: skip
    for what, found in shapes.items():
        if len(found) > 1:
            problems.append(f"{ARRAYS}: {what} shapes differ between steps ({sorted(found)})")
    require(problems)
    return ""


def check_anchor(b: BundleView) -> str:
    from kimi_jax.ledger.anchor_record import ANCHOR_VERSION, ANCHORED, condition_differences
    from kimi_jax.storage.codecs import LEGACY_DEQUANT_NOTE, recorded_dequant

    ledger = b.ledger
    record = ledger.get("anchor")
    if not b.has("anchor.json"):
        if record is None:
            raise CheckSkipped("the bundle carries no anchor (no anchor.json, ledger.anchor is null)")
        raise CheckFailed(f"anchor.json: missing, but ledger.json anchor records a matched anchor ({short(record)})")
    if not isinstance(record, dict):
        raise CheckFailed("anchor.json is present but ledger.json anchor is null; the run did not check it")
    anchor = b.json("anchor.json")
    if not isinstance(anchor, dict):
        raise CheckFailed("anchor.json: expected a JSON object")
    problems = []
    if anchor.get("anchor_version") != ANCHOR_VERSION:
        problems.append(f"anchor.json: anchor_version is {short(anchor.get('anchor_version'))}, "
                        f"expected {ANCHOR_VERSION}" + (f" (a version-1 anchor was computed with dequantization "
                                                        f"{LEGACY_DEQUANT_NOTE})" if anchor.get("anchor_version") == 1
                                                        else ""))  # fmt: skip
    steps = b.steps()
    if not steps:
        raise CheckFailed("ledger.json: steps: empty; step 0 is compared with the anchor")
    step0 = steps[0]
    for field in ANCHORED:
        if field not in anchor:
            problems.append(f"anchor.json: {field}: missing")
        elif anchor[field] != step0.get(field):
            problems.append(f"steps[0].{field} is {short(step0.get(field))}, anchor.json has {short(anchor[field])}")
    ckpt = ledger.get("checkpoint") or {}
    run = ledger.get("run") or {}
    want = {"prompt": run.get("prompt"), "dtype": run.get("dtype"), "dequant": recorded_dequant(run.get("dequant")),
            "kv_cache": run.get("kv_cache"), "sampling": run.get("sampling")}  # fmt: skip
    mesh = run.get("mesh")
    if isinstance(mesh, dict) or "mesh" in anchor:  # an anchor frozen on a mesh, or a mesh run's bundle
        want["mesh"] = mesh_label(mesh["expert"], mesh["model"], mesh["placement"]) if isinstance(mesh, dict) else None
    problems += [f"anchor.json was frozen for a different run: {d}" for d in condition_differences(anchor, want)]
    frozen = anchor.get("checkpoint") if isinstance(anchor.get("checkpoint"), dict) else {}
    for key in identity_differences(frozen, ckpt):
        problems.append(f"anchor.json: checkpoint.{key} is {short(frozen.get(key))}, this run's is {short(ckpt.get(key))}")
    digest = blake3.blake3(read_regular(b.root / "anchor.json", MAX_JSON_BYTES, "anchor.json")).hexdigest()
    if record.get("anchor_digest") != digest:
        problems.append(f"ledger.json anchor.anchor_digest is {short(record.get('anchor_digest'))}, but "
                        f"BLAKE3(anchor.json) is {digest}")  # fmt: skip
    if record.get("status") != "matched":
        problems.append(f"ledger.json anchor.status is {short(record.get('status'))}, expected 'matched'")
    require(problems)
    return ""


def check_continuity(b: BundleView) -> str:
    ledger = b.ledger
    steps = b.steps()
    run = ledger.get("run") or {}
    prompt = run.get("prompt")
    problems = []
    if not steps:
        raise CheckFailed("ledger.json: steps: empty")
    problems += _stop_problems(b, steps, run)
    layer_plan: list[tuple[Any, Any]] | None = None
    outside, note = _embedding_head_bytes(ledger)
    processes = (run.get("mesh") or {}).get("process_count", 1)
    for n, step in enumerate(steps):
        if step.get("index") != n:
            problems.append(f"steps[{n}].index is {short(step.get('index'))}, expected {n}")
        context = step.get("context")
        if n == 0:
            if context != prompt:
                problems.append(f"steps[0].context {short(context)} is not run.prompt {short(prompt)}")
        else:
            prev = steps[n - 1]
            want = (prev.get("context") or []) + [prev.get("token")] if isinstance(prev.get("context"), list) else None
            if context != want:
                problems.append(f"steps[{n}].context {short(context)} is not steps[{n - 1}].context + "
                                f"[steps[{n - 1}].token] = {short(want)}")  # fmt: skip
        layers = step.get("layers") or []
        indices = [layer.get("layer") for layer in layers]
        if indices != list(range(len(layers))):
            problems.append(f"steps[{n}].layers: layer indices are {short(indices)}, expected 0..{len(layers) - 1}")
        plan = [(layer.get("layer"), layer.get("kind")) for layer in layers]
        if layer_plan is None:
            layer_plan = plan
        elif plan != layer_plan:
            problems.append(f"steps[{n}].layers: layers/kinds {short(plan)} differ from steps[0]'s "
                            f"{short(layer_plan)}")
        problems.extend(_byte_source_problems(n, step, layers))
        layer_bytes = sum(int(layer.get("bytes_read") or 0) for layer in layers)
        step_bytes = step.get("bytes_read")
        if not isinstance(step_bytes, int) or step_bytes < layer_bytes:
            problems.append(f"steps[{n}].bytes_read is {short(step_bytes)}, less than the sum of its layers' "
                            f"bytes_read ({layer_bytes}); it also counts embedding rows and the head")  # fmt: skip
        elif outside is not None and isinstance(context, list):
            extra = outside(n, context)
            if step_bytes != layer_bytes + extra:
                problems.append(f"steps[{n}].bytes_read is {step_bytes}, expected {layer_bytes + extra}: its layers' "
                                f"{layer_bytes} plus {extra} for embedding rows and the head")  # fmt: skip
        problems += _per_process_problems(f"steps[{n}]", step, processes)
        for layer in layers:
            problems += _per_process_problems(f"steps[{n}].layers[{layer.get('layer')}]", layer, processes)
    total = sum(int(s.get("bytes_read") or 0) for s in steps)
    totals = ledger.get("totals") or {}
    recorded = totals.get("bytes_read")
    if recorded != total:
        problems.append(f"totals.bytes_read is {short(recorded)}, but the steps' bytes_read sum to {total}")
    columns = [sum(col) for col in zip(*(s.get("bytes_per_process") or [] for s in steps))]
    if "bytes_per_process" in totals and totals.get("bytes_per_process") != columns:
        problems.append(f"totals.bytes_per_process is {short(totals.get('bytes_per_process'))}, but the steps' "
                        f"bytes_per_process sum to {columns}")  # fmt: skip
    require(problems)
    return note


SERVED_FROM = ("bytes_from_memory", "bytes_from_storage", "bytes_from_speculation")
READ_ASIDE = ("bytes_mispredicted", "bytes_preloaded", "bytes_overread")


def _byte_source_problems(n: int, step: dict[str, Any], layers: list[dict[str, Any]]) -> list[str]:
    """Version 2: every byte used was served from exactly one source, layer by layer and per step (the
    step adds the embedding rows and head to its layers); counts of experts are subsets of each other."""
    problems = []
    for where, entry in [(f"steps[{n}]", step)] + [(f"steps[{n}].layers[{i}]", layer) for i, layer in enumerate(layers)]:
        if not all(isinstance(entry.get(k), int) for k in SERVED_FROM):
            continue  # a version 1 ledger
        served = sum(entry[k] for k in SERVED_FROM)
        if served != entry.get("bytes_read"):
            problems.append(f"{where}: bytes_from_memory + bytes_from_storage + bytes_from_speculation = {served}, "
                            f"but bytes_read is {short(entry.get('bytes_read'))}")  # fmt: skip
        for part, whole in (("experts_from_memory", "experts_used"), ("experts_predicted_used", "experts_predicted"),
                            ("experts_predicted_used", "experts_used")):  # fmt: skip
            if isinstance(entry.get(part), int) and entry[part] > int(entry.get(whole) or 0):
                problems.append(f"{where}: {part} {entry[part]} exceeds {whole} {short(entry.get(whole))}")
    for key in SERVED_FROM + READ_ASIDE:
        if isinstance(step.get(key), int):
            in_layers = sum(int(layer.get(key) or 0) for layer in layers)
            if step[key] < in_layers:
                problems.append(f"steps[{n}].{key} is {step[key]}, less than its layers' sum {in_layers}")
    return problems


def _stop_problems(b: BundleView, steps: list[dict[str, Any]], run: dict[str, Any]) -> list[str]:
    """The run ended where its stop rules (run.stop, the token budget) say, and ``stopped`` says why."""
    from kimi_jax.ledger.text_fields import decoding_from_ledger

    budget, stopped = run.get("max_new_tokens"), b.ledger.get("stopped") or {}
    if not isinstance(budget, int) or len(steps) > budget:
        return [f"run.max_new_tokens is {short(budget)}, but the ledger has {len(steps)} steps"]
    tokenizer = None
    if (run.get("stop") or {}).get("strings"):
        try:
            tokenizer = b.tokenizer()
        except CheckFailed as e:
            return [f"stop strings not checked: {e}"]
    decoding = decoding_from_ledger(b.ledger, tokenizer)
    tokens = [s.get("token") for s in steps]
    problems = [f"steps[{n}]: the run should have stopped here ({decoding.stop_reason(tokens[: n + 1])})"
                for n in range(len(tokens) - 1) if decoding.stop_reason(tokens[: n + 1])]  # fmt: skip
    want = decoding.final_reason(tokens)
    if len(steps) < budget and want["reason"] == "max_new_tokens":
        problems.append(f"the ledger has {len(steps)} steps, fewer than run.max_new_tokens {budget}, and no stop rule "
                        "holds at the last one")  # fmt: skip
    if stopped != want:
        problems.append(f"stopped is {short(stopped)}, but the stop rules give {short(want)}")
    return problems


def _per_process_problems(where: str, record: dict[str, Any], processes: int) -> list[str]:
    """A step's or layer's bytes_per_process: one count per process of the run, summing to what was
    read from storage (``bytes_from_storage``; ``bytes_read`` in a ledger without the split)."""
    counts = record.get("bytes_per_process")
    if counts is None and processes == 1:
        return []  # a ledger that does not itemise processes: one process read everything
    if not isinstance(counts, list) or len(counts) != processes:
        return [f"{where}.bytes_per_process is {short(counts)}, expected one count for each of the {processes} process(es)"]
    field = "bytes_from_storage" if "bytes_from_storage" in record else "bytes_read"
    if sum(counts) != record.get(field):
        return [f"{where}.bytes_per_process {short(counts)} sums to {sum(counts)}, but {field} is "
                f"{short(record.get(field))}"]  # fmt: skip
    return []


def _embedding_head_bytes(ledger: dict[str, Any]) -> tuple[Callable[[int, list], int] | None, str]:
    """Bytes a step reads outside the decoder layers (the embedding rows of the distinct input tokens of
    its forward pass, the final norm and the head), when the ledger's checkpoint is on disk with the
    recorded identity; otherwise (None, note) and only ``bytes_read >= sum of layers`` is checked."""
    from kimi_jax.storage.checkpoint import open_checkpoint

    ckpt = ledger.get("checkpoint") or {}
    path = ckpt.get("path")
    unchecked = ("embedding and head bytes not itemised: checkpoint not available, so each step was only checked "
                 "to read at least its layers' bytes")  # fmt: skip
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        return None, unchecked
    try:
        index = open_checkpoint(path)
        same = (index.config.digest() == ckpt.get("config_digest")
                and index.tensor_list_digest() == ckpt.get("tensor_list_digest"))  # fmt: skip
    except Exception:
        return None, unchecked
    if not same:
        return None, unchecked.replace("checkpoint not available", f"the checkpoint at {path} is not the one recorded")
    row = index.embed_row_bytes()
    head = sum(w.nbytes for w in index.head.values())
    kv_cache = bool((ledger.get("run") or {}).get("kv_cache"))

    def outside(n: int, context: list) -> int:
        tokens = context[-1:] if kv_cache and n > 0 else context
        return len(set(tokens)) * row + head

    return outside, ""


def check_non_perturbation(b: BundleView) -> str:
    if not b.has("non_perturbation.json"):
        raise CheckFailed("non_perturbation.json: missing; the bundle carries no proof that capture did not perturb the "
                    "run (a --no-prove run?)")  # fmt: skip
    proof = b.json("non_perturbation.json")
    ledger = b.ledger
    problems = []
    if ledger.get("non_perturbation") != proof:
        problems.append("non_perturbation.json differs from ledger.json non_perturbation")
    if not isinstance(proof, dict):
        raise CheckFailed(join_problems([*problems, "non_perturbation.json: expected an object with compared, bare, instrumented, "
                                      "identical"]))  # fmt: skip
    if proof.get("identical") is not True:
        problems.append(f"non_perturbation.json: identical is {short(proof.get('identical'))}, expected true")
    compared = proof.get("compared")
    if not isinstance(compared, list) or not set(NP_FIELDS) <= set(compared):
        problems.append(f"non_perturbation.json: compared is {short(compared)}, expected it to cover "
                        f"{list(NP_FIELDS)}")
    bare, inst = proof.get("bare"), proof.get("instrumented")
    if bare != inst:
        first = first_list_difference(bare, inst)
        problems.append(f"non_perturbation.json: bare and instrumented differ ({first})")
    own = [{"step": s.get("index"), **{k: s.get(k) for k in NP_FIELDS}} for s in b.steps()]
    if inst != own:
        first = first_list_difference(inst, own)
        problems.append(f"non_perturbation.json: instrumented does not match the ledger's steps ({first})")
    require(problems)
    return ""


def first_list_difference(a: Any, b: Any) -> str:
    if not isinstance(a, list) or not isinstance(b, list):
        return f"{short(a, 40)} vs {short(b, 40)}"
    for n, (x, y) in enumerate(zip(a, b)):
        if x != y:
            if isinstance(x, dict) and isinstance(y, dict):
                keys = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
                return f"entry {n}: " + ", ".join(f"{k} {short(x.get(k), 30)} vs {short(y.get(k), 30)}" for k in keys)
            return f"entry {n}: {short(x, 40)} vs {short(y, 40)}"
    return f"{len(a)} entries vs {len(b)}"


class _DataBlocks(HTMLParser):
    """Every <script> whose type is JSON: (attributes, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.blocks: list[tuple[dict[str, str | None], str]] = []
        self._open: tuple[dict[str, str | None], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "script":
            attributes = {k.lower(): v for k, v in attrs}
            kind = (attributes.get("type") or "").split(";")[0].strip().lower()
            if kind == "application/json" or kind.endswith("+json") or kind == "text/json":
                self._open = (attributes, [])

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._open is not None:
            self.blocks.append((self._open[0], "".join(self._open[1])))
            self._open = None


def check_explorer(b: BundleView) -> str:
    """The page is a pure function of the ledger, so it must be byte for byte the page this
    kimi-jax renders from ledger.json: nothing planted in it (a script, a link) survives."""
    from kimi_jax.explorer.page import render_explorer

    if not b.has("explorer.html"):
        raise CheckSkipped("the bundle has no explorer.html")
    try:
        page = read_regular(b.root / "explorer.html", 2 * MAX_JSON_BYTES, "explorer.html")
        want = render_explorer(b.ledger).encode("utf-8")
    except KimiJaxError as e:
        raise CheckFailed(b.relative(str(e))) from None
    if page == want:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(page, want)) if x != y), min(len(page), len(want)))
    why = [f"explorer.html: not the page rendered from ledger.json (first difference at byte {at:,} of "
           f"{len(page):,}; the rendered page has {len(want):,} bytes)"]  # fmt: skip
    try:
        text = page.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckFailed(join_problems([*why, f"explorer.html: not UTF-8 ({e})"])) from None
    problems = _explain_page(b, text)
    require(why + problems)
    return ""


def _explain_page(b: BundleView, text: str) -> list[str]:
    """What differs in a page that is not the rendered one: its embedded ledger, or extra data blocks."""
    parser = _DataBlocks()
    parser.feed(text)
    parser.close()
    problems = []
    ours = [(a, t) for a, t in parser.blocks if a.get("id") == EXPLORER_ELEMENT_ID]
    others = [a.get("id") or "(no id)" for a, _ in parser.blocks if a.get("id") != EXPLORER_ELEMENT_ID]
    if len(ours) != 1:
        problems.append(f"explorer.html: expected exactly one <script type=\"application/json\" "
                        f"id=\"{EXPLORER_ELEMENT_ID}\">, found {len(ours)}")  # fmt: skip
    if others:
        problems.append(f"explorer.html: holds other JSON data blocks (ids {', '.join(others)}); expected only "
                        f"#{EXPLORER_ELEMENT_ID}")  # fmt: skip
    if len(ours) == 1:
        try:
            embedded = parse_json(ours[0][1].encode("utf-8", "surrogatepass"), "explorer.html")
        except KimiJaxError as e:
            problems.append(f"explorer.html: #{EXPLORER_ELEMENT_ID} is not valid JSON ({e})")
        else:
            if embedded != b.json("ledger.json"):
                where = first_difference(b.json("ledger.json"), embedded, "")
                problems.append(f"explorer.html: the ledger embedded in #{EXPLORER_ELEMENT_ID} differs from "
                                f"ledger.json (first at {where or '<root>'})")  # fmt: skip
    return problems


def first_difference(a: Any, b: Any, here: str) -> str | None:
    diffs = differences(a, b, here, limit=1)
    return diffs[0][0] if diffs else None


def differences(a: Any, b: Any, here: str, limit: int = 20, skip: Callable[[str], bool] | None = None,
                 out: list | None = None) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """``(path, a value, b value)`` where two JSON values differ, depth first, at most ``limit``."""
    out = [] if out is None else out
    if len(out) >= limit or (skip is not None and skip(here)):
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{here}.{key}" if here else str(key)
            if key not in a or key not in b:
                if not (skip is not None and skip(path)):
                    out.append((path, a.get(key, "<absent>"), b.get(key, "<absent>")))
            else:
                differences(a[key], b[key], path, limit, skip, out)
            if len(out) >= limit:
                break
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for n, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{here}[{n}]", limit, skip, out)
            if len(out) >= limit:
                break
    elif a != b or isinstance(a, bool) != isinstance(b, bool):
        out.append((here, a, b))
    return out
