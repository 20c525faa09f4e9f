"""Run bundles: everything needed to prove, without the model, what a run produced.

Layout of a bundle directory::

    manifest.json           the resolved manifest (absolute paths, defaults filled in)
    manifest.yaml           the manifest file as written (absent for a manifest built in code)
    ledger.json             the output formation ledger
    anchor.json             a copy of the anchor checked in step 0 (absent when none is named)
    non_perturbation.json   the bare-vs-instrumented record (absent for --no-prove runs)
    provenance.json         {ledger field: measured | derived}, the labels displays use
    environment.json        platform fingerprint, Python packages, relevant environment variables
    tokenizer/              copies of the checkpoint's tokenizer files the ledger's digests cover
                            (absent when it ships none), so verify re-derives every text field
    arrays/                 orbax-checkpoint tree {"step_00000": {"hidden": f32[H], "logits": f32[V]}, ...}
    explorer.html           the offline explorer page
    certification.json      the note's certification table as data (verify's certification checks)
    note.pdf                the technical note, rendered from the files above (kimi_jax/note)
    CHECKSUMS.b3            BLAKE3 of every file above, in the format ``b3sum --check`` reads
    receipt.json            bundle digest (BLAKE3 of CHECKSUMS.b3), manifest digest, anchor, verdict, time

A bundle is assembled in a hidden sibling directory and renamed into place only when complete,
so a crashed run never leaves something that looks like a bundle. An existing folder is replaced
only when it is provably a kimi-jax bundle (:func:`not_a_bundle`); a run killed during the swap
leaves folders named and marked with its lock's token, which the next run over the same folder
restores or removes, and it touches nothing else (:mod:`kimi_jax.ledger.swap`).

Readers of bundles strangers send never trust sizes: JSON files are read through
:data:`MAX_JSON_BYTES`, and the orbax arrays' declared shapes are checked before anything is
read (:func:`check_array_declarations`).
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import blake3
import numpy as np

from kimi_jax.errors import KimiJaxError, OutputError, TokenizerError
from kimi_jax.fileio import read_json, read_regular, write_bytes_atomic, write_failure, write_json_atomic
from kimi_jax.ledger.checksums import CHECKSUMS_NAME, MAX_LISTING_BYTES, verify_checksums, write_checksums
from kimi_jax.ledger.ledger import provenance_map
from kimi_jax.ledger.sequences import is_multi, schema_of, sequence_view
from kimi_jax.ledger.swap import MARKER, current_token, mark, partial_dir, recover, replace

BUNDLE_VERSION = 1
CHECKSUMS = CHECKSUMS_NAME
RECEIPT = "receipt.json"
ARRAYS = "arrays"
TOKENIZER = "tokenizer"

# What a bundle can legitimately hold; every reader of a bundle enforces these bounds.
# ledger.json grows with steps x positions x layers of routing, about 50 KB per position-step at
# Kimi K2.5's size (60 MoE layers, top-8): 256 MiB holds some 5,000 position-steps, e.g. a
# 1,000-token prompt and 5 new tokens without a KV cache. Every other JSON file is far smaller.
MAX_JSON_BYTES = 256 * 1024 * 1024
# Per-step arrays are float32 [vocab] and [hidden]; the largest real models have vocabularies of
# about 2**18 and hidden sizes of about 2**15.
MAX_VOCAB = 2**22
MAX_HIDDEN = 2**17
# float32 logits and hidden states do not compress (orbax stores them nearly raw), so a tree that
# declares more than this many times the bytes it holds on disk declares arrays it does not have.
MAX_ARRAY_EXPANSION = 4


# Every file a bundle may hold (see the module doc); under arrays/ the names orbax-checkpoint
# gives the files of one PyTree checkpoint (metadata, the OCDBT manifest and data files).
BUNDLE_FILES = ("manifest.json", "manifest.yaml", "ledger.json", "anchor.json", "non_perturbation.json",
                "provenance.json", "environment.json", "explorer.html", "certification.json", "note.pdf", CHECKSUMS,
                RECEIPT)  # fmt: skip
ARRAY_FILES = re.compile(r"(_CHECKPOINT_METADATA|_METADATA|_ROOT_METADATA|_sharding|commit_success\.txt"
                         r"|array_metadatas/process_\d+"
                         r"|(ocdbt\.process_\d+/)?(manifest\.ocdbt|d/[0-9a-f]+))")  # fmt: skip
TOKENIZER_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def in_bundle_layout(rel: str) -> bool:
    """Whether a file at relative path ``rel`` (forward slashes) belongs in a bundle."""
    if rel.startswith(ARRAYS + "/"):
        return ARRAY_FILES.fullmatch(rel[len(ARRAYS) + 1 :]) is not None
    if rel.startswith(TOKENIZER + "/"):  # copies of the checkpoint's tokenizer files: plain names, one level
        return TOKENIZER_FILE.fullmatch(rel[len(TOKENIZER) + 1 :]) is not None
    return rel in BUNDLE_FILES


class BundleError(KimiJaxError):
    """A bundle's files are not what a kimi-jax bundle holds."""


def step_key(index: int) -> str:
    return f"step_{index:05d}"


STEP_KEY = re.compile(r"step_\d{5,}")


def _local_checkpointer():
    """An orbax checkpointer that involves only this process: in a multi-process run only process 0
    writes the bundle, and orbax would otherwise wait at a barrier for every process (imports JAX:
    only a run, which already has, saves arrays)."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=only_me), multiprocessing_options=only_me)


def save_arrays(path: Path, steps) -> None:
    """Each step's arrays under its place in ``steps``: its index in a one-sequence run, and for several
    sequences (steps in sequence order) the flat numbering of :func:`kimi_jax.ledger.sequences.array_offsets`."""
    tree = {step_key(n): {"hidden": np.asarray(s.hidden, np.float32), "logits": np.asarray(s.logits, np.float32)}
            for n, s in enumerate(steps)}  # fmt: skip
    _local_checkpointer().save(path.resolve(), tree)


def load_arrays(bundle: Path, steps: list[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{step: (logits, hidden)} from the bundle's orbax tree, read with tensorstore directly: orbax
    stores each leaf ``step_NNNNN.{logits,hidden}`` as a zarr array (inside its OCDBT key-value
    store when it used one), and reading them without orbax keeps JAX, which orbax imports, out of
    verify and compare. The arrays' declarations are checked (:func:`check_array_declarations`,
    ``steps``: the ledger's step indices, when known) before any chunk is read."""
    root = (Path(bundle) / ARRAYS).resolve()
    stores = check_array_declarations(root, steps)
    leaves: dict[int, dict[str, np.ndarray]] = {}
    for (step, what), store in stores.items():
        try:
            leaves.setdefault(step, {})[what] = np.asarray(store.read().result())
        except Exception as e:  # tensorstore raises many kinds on a damaged chunk
            raise BundleError(f"{ARRAYS}/{step_key(step)}.{what}: cannot read the array "
                              f"({type(e).__name__}: {str(e)[:200]})") from None  # fmt: skip
    return {step: (leaf["logits"], leaf["hidden"]) for step, leaf in leaves.items()}


def check_array_declarations(root: Path, steps: list[int] | None) -> dict[tuple[int, str], Any]:
    """From the stored metadata alone, before any chunk is read: the tree holds ``step_NNNNN``
    entries (of ``steps`` when given), each exactly ``{hidden, logits}``, float32 vectors of one
    length per name, at most :data:`MAX_HIDDEN` / :data:`MAX_VOCAB` long, and all of them together
    at most :data:`MAX_ARRAY_EXPANSION` times the bytes the tree holds on disk. Returns the opened
    (not yet read) tensorstore arrays, {(step, "hidden" | "logits"): array}. Reads the zarr
    metadata with tensorstore, not orbax, so JAX is never imported."""
    import tensorstore as ts

    root = Path(root).resolve()  # a file:// URL of a relative path would name a host, not a folder
    where = f"{ARRAYS}/"
    meta = read_json(root / "_METADATA", MAX_JSON_BYTES, f"{ARRAYS}/_METADATA", BundleError)
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise BundleError(f"{where}_METADATA: expected an orbax tree_metadata object")
    wanted = None if steps is None else {f"('{step_key(i)}', '{name}')" for i in steps for name in ("hidden", "logits")}
    for key in tree:
        if wanted is not None and key not in wanted:
            raise BundleError(f"{where}_METADATA: declares {key[:80]}, which is not a step of the ledger "
                              "(expected hidden and logits of each step)")  # fmt: skip
    if wanted is None and len(tree) % 2:
        raise BundleError(f"{where}_METADATA: declares {len(tree)} arrays; expected hidden and logits per step")
    kvstore = {"driver": "ocdbt", "base": f"file://{root}"} if (root / "manifest.ocdbt").is_file() else \
        {"driver": "file", "path": f"{root}/"}  # fmt: skip
    drivers = {".zarray": "zarr", "zarr.json": "zarr3"}  # the file that marks an array, by zarr version
    declared: dict[str, dict[str, Any]] = {}
    try:
        for key in sorted(ts.KvStore.open(kvstore).result().list().result()):
            name, _, marker = key.decode("utf-8", "replace").rpartition("/")
            if marker not in drivers:
                continue
            step, _, what = name.partition(".")
            spec = {"driver": drivers[marker], "kvstore": {**kvstore, "path": kvstore.get("path", "") + name + "/"}}
            # open=True reads the array's metadata (.zarray / zarr.json) only, no chunk
            declared.setdefault(step, {})[what] = ts.open(spec, open=True).result()
    except Exception as e:  # tensorstore raises many kinds on a damaged tree
        raise BundleError(f"{where}: cannot read the array metadata ({type(e).__name__}: {str(e)[:200]})") from None
    if not declared:
        raise BundleError(f"{where}: holds no arrays; expected hidden and logits of each step")
    lengths: dict[str, set[int]] = {"hidden": set(), "logits": set()}
    total = 0
    stores: dict[tuple[int, str], Any] = {}
    for key, arrays in declared.items():
        if not STEP_KEY.fullmatch(key) or set(arrays) != {"hidden", "logits"}:
            raise BundleError(f"{where}{key[:40]}: expected a step_NNNNN entry holding hidden and logits")
        if wanted is not None and f"('{key}', 'hidden')" not in wanted:
            raise BundleError(f"{where}{key[:40]}: not a step of the ledger")
        for name, store in arrays.items():
            shape, dtype = tuple(int(n) for n in store.shape), store.dtype.name
            if len(shape) != 1 or dtype != "float32":
                raise BundleError(f"{where}{key}/{name}: declared {dtype}{list(shape)}, expected a float32 vector")
            lengths[name].add(shape[0])
            total += 4 * shape[0]
            stores[(int(key.split("_")[1]), name)] = store
    for name, bound in (("logits", MAX_VOCAB), ("hidden", MAX_HIDDEN)):
        if len(lengths[name]) > 1 or any(n > bound or n == 0 for n in lengths[name]):
            raise BundleError(f"{where}: {name} declared with lengths {sorted(lengths[name])[:4]}; expected one "
                              f"length per bundle, between 1 and {bound:,}")  # fmt: skip
    on_disk = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(root) for f in files)
    if total > MAX_ARRAY_EXPANSION * on_disk + (1 << 20):
        raise BundleError(f"{where}: the metadata declares {total:,} bytes of arrays, but the tree holds only "
                          f"{on_disk:,} bytes on disk; float32 logits and hidden states do not compress "
                          "that far")  # fmt: skip
    return stores


@functools.cache
def _installed_packages() -> tuple[str, ...]:
    """Read once per process: a server writes a bundle per request, and reading every package's
    metadata takes longer than the rest of a small bundle."""
    return tuple(sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]))


def environment_record() -> dict[str, Any]:
    from kimi_jax.platform_info import platform_fingerprint

    packages = list(_installed_packages())
    env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "KIMI_JAX_", "TF_CPP")) or k in
           ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # fmt: skip
    return {"platform": platform_fingerprint(), "python_executable": sys.executable, "packages": packages,
            "environment": env}  # fmt: skip


def bundle_digest(bundle: Path) -> str:
    """BLAKE3 of the bundle's ``CHECKSUMS.b3`` (read only if it is a regular file of sane size)."""
    return blake3.blake3(read_regular(Path(bundle) / CHECKSUMS, MAX_LISTING_BYTES, CHECKSUMS)).hexdigest()


def write_bundle(out: Path, manifest, ledger: dict, steps, anchor_file: Path | None, explorer_html: str | None,
                 tokenizer_dir: Path | None = None, render_from_files: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Assemble the bundle beside ``out`` and move it into place atomically; returns ``out``.

    ``tokenizer_dir`` holds the tokenizer files the ledger names (default: the checkpoint folder;
    a remote checkpoint's are in its local mirror). ``render_from_files(folder)`` is called with the
    assembled folder before ``CHECKSUMS.b3`` is written, to add the files rendered from the others
    (the runner passes the note's writer, which sits above this module)."""
    out = Path(out)
    token = current_token(out)
    work = partial_dir(out, token)
    made = False
    try:
        work.mkdir()  # exclusive: a folder of that name is never ours to reuse
        made = True
        mark(work, token)
        _assemble(work, manifest, ledger, steps, anchor_file, explorer_html, tokenizer_dir, render_from_files)
        swap_into_place(work, out, token)
    except BaseException as e:
        if made:
            shutil.rmtree(work, ignore_errors=True)  # our own partial bundle would keep the disk full
        reason = write_failure(e)
        if reason is None:
            raise
        raise OutputError(f"{out}: cannot write the bundle: {reason}; the partial bundle was removed") from None
    return out


def _assemble(work: Path, manifest, ledger: dict, steps, anchor_file: Path | None, explorer_html: str | None,
              tokenizer_dir: Path | None, render_from_files: Callable[[Path], None] | None = None) -> None:  # fmt: skip
    write_json_atomic(work / "manifest.json", manifest.resolved_dict())
    if manifest.source is not None and Path(manifest.source).exists():
        shutil.copyfile(manifest.source, work / "manifest.yaml")
    write_json_atomic(work / "ledger.json", ledger)
    if anchor_file is not None:
        shutil.copyfile(anchor_file, work / "anchor.json")
    proofs = non_perturbation_file(ledger)
    if proofs is not None:
        write_json_atomic(work / "non_perturbation.json", proofs)
    write_json_atomic(work / "provenance.json", provenance_map(schema_of(ledger)))
    write_json_atomic(work / "environment.json", environment_record())
    save_arrays(work / ARRAYS, steps)
    checkpoint = ledger["checkpoint"]
    for name, digest in ((checkpoint.get("tokenizer") or {}).get("files") or {}).items():
        source = Path(tokenizer_dir or checkpoint["path"]) / name
        (work / TOKENIZER).mkdir(exist_ok=True)
        shutil.copyfile(source, work / TOKENIZER / name)
        if blake3.blake3((work / TOKENIZER / name).read_bytes()).hexdigest() != digest:
            raise TokenizerError(f"{source}: changed during the run (its BLAKE3 is no longer the ledger's); no bundle "
                                 "written")  # fmt: skip
    if explorer_html is not None:
        write_bytes_atomic(work / "explorer.html", explorer_html.encode())
    if render_from_files is not None:
        render_from_files(work)
    write_checksums(work, exclude=(MARKER,))
    anchor = anchor_record(ledger)
    receipt = {
        "receipt_version": BUNDLE_VERSION,
        "bundle_digest": bundle_digest(work),
        "manifest_digest": ledger["manifest_digest"],
        "anchor": None if anchor is None else {"file": anchor["file"], "digest": anchor["anchor_digest"]},
        "verdict": receipt_verdict(ledger),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_json_atomic(work / RECEIPT, receipt)


def anchor_record(ledger: dict) -> Any:
    """The ledger's anchor record: a multi-sequence ledger's is sequence 0's (the anchor step's)."""
    return ledger["sequences"][0].get("anchor") if is_multi(ledger) else ledger.get("anchor")


def non_perturbation_file(ledger: dict) -> Any:
    """What ``non_perturbation.json`` holds: the ledger's proof, or a multi-sequence ledger's list of
    each sequence's; None when the run proved nothing."""
    if is_multi(ledger):
        proofs = [s.get("non_perturbation") for s in ledger["sequences"]]
        return None if all(p is None for p in proofs) else proofs
    return ledger.get("non_perturbation")


def receipt_verdict(ledger: dict) -> dict[str, Any]:
    """The receipt's verdict: non-perturbing, anchor matched, steps and tokens (a multi-sequence
    ledger: steps and tokens per sequence, non-perturbing only if every sequence's proof holds)."""
    views = [sequence_view(ledger, i) for i in range(len(ledger["sequences"]))] if is_multi(ledger) else [ledger]
    proven = [bool(isinstance(v.get("non_perturbation"), dict) and v["non_perturbation"].get("identical") is True)
              for v in views]  # fmt: skip
    steps = [len(v["steps"]) for v in views]
    tokens = [[s.get("token") for s in v["steps"]] for v in views]
    multi = is_multi(ledger)
    return {"non_perturbing": all(proven), "anchor_matched": anchor_record(ledger) is not None,
            "steps": steps if multi else steps[0], "tokens": tokens if multi else tokens[0]}  # fmt: skip


def swap_into_place(work: Path, out: Path, token: str) -> None:
    """Replace ``out`` by ``work`` (marked with ``token``); an existing bundle is only removed once
    the new one is in place, and a kill at any point is undone by :func:`recover_interrupted_swap`."""
    if out.exists() or out.is_symlink():
        problem = not_a_bundle(out)
        if problem is not None:
            raise OutputError(f"{out}: not replaced: {problem}")
    replace(work, out, token)


def not_a_bundle(out: Path) -> str | None:
    """Why the existing ``out`` may not be replaced by a new bundle, or None when it may: it is an
    empty folder, or a kimi-jax bundle whose receipt's bundle_digest is the BLAKE3 of its
    ``CHECKSUMS.b3`` and whose every file is listed there with its digest, so replacing it loses
    nothing but a bundle. A file named ledger.json or receipt.json proves nothing."""
    if out.is_symlink() or not out.is_dir():
        return "it exists and is not a folder (a bundle is a folder)"
    if not any(out.iterdir()):
        return None
    listing = "a kimi-jax bundle is replaced only when its receipt.json verifies against its CHECKSUMS.b3"
    try:
        receipt = read_json(out / RECEIPT, MAX_JSON_BYTES, RECEIPT, BundleError)
        listed = bundle_digest(out)
    except (KimiJaxError, OSError) as e:
        return f"it is a non-empty folder that is not a kimi-jax bundle ({str(e)[:160]}); {listing}"
    if not isinstance(receipt, dict) or listed is None or receipt.get("bundle_digest") != listed:
        return (f"it is a non-empty folder that is not a kimi-jax bundle ({RECEIPT} does not match {CHECKSUMS}); "
                f"{listing}")
    problems = verify_checksums(out, exclude=(CHECKSUMS, RECEIPT))
    if problems:
        return (f"it holds files that are not part of its bundle ({problems[0]}"
                f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); {listing}")  # fmt: skip
    return None


def recover_interrupted_swap(out: Path) -> list[str]:
    """Finish what runs killed while writing ``out`` left beside it, touching only folders provably
    theirs (:func:`kimi_jax.ledger.swap.recover`). Call only while holding the output lock."""
    return recover(out)
