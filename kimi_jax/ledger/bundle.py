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
    CHECKSUMS.b3            BLAKE3 of every file above, in the format ``b3sum --check`` reads
    receipt.json            bundle digest (BLAKE3 of CHECKSUMS.b3), manifest digest, anchor, verdict, time

A bundle is assembled in a hidden sibling directory and renamed into place only when complete,
so a crashed run never leaves something that looks like a bundle.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from kimi_jax.errors import TokenizerError
from kimi_jax.fileio import write_bytes_atomic, write_json_atomic
from kimi_jax.ledger.checksums import CHECKSUMS_NAME, write_checksums
from kimi_jax.ledger.ledger import provenance_map

BUNDLE_VERSION = 1
CHECKSUMS = CHECKSUMS_NAME
RECEIPT = "receipt.json"
ARRAYS = "arrays"
TOKENIZER = "tokenizer"


def step_key(index: int) -> str:
    return f"step_{index:05d}"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def save_arrays(path: Path, steps) -> None:
    import orbax.checkpoint as ocp

    tree = {step_key(s.index): {"hidden": np.asarray(s.hidden, np.float32), "logits": np.asarray(s.logits, np.float32)}
            for s in steps}  # fmt: skip
    ocp.PyTreeCheckpointer().save(path.resolve(), tree)


def load_arrays(bundle: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{step: (logits, hidden)} from the bundle's orbax tree, read with tensorstore directly: orbax
    stores each leaf ``step_NNNNN.{logits,hidden}`` as a zarr array (inside its OCDBT key-value
    store when it used one), and reading them without orbax keeps JAX, which orbax imports, out of
    verify and compare."""
    import tensorstore as ts

    root = (Path(bundle) / ARRAYS).resolve()
    kvstore = {"driver": "ocdbt", "base": f"file://{root}"} if (root / "manifest.ocdbt").is_file() else \
        {"driver": "file", "path": f"{root}/"}  # fmt: skip
    drivers = {".zarray": "zarr", "zarr.json": "zarr3"}  # the file that marks an array, by zarr version
    leaves: dict[int, dict[str, np.ndarray]] = {}
    for key in sorted(ts.KvStore.open(kvstore).result().list().result()):
        name, _, marker = key.decode().rpartition("/")
        if marker not in drivers or not name.startswith("step_"):
            continue
        step, _, what = name.partition(".")
        spec = {"driver": drivers[marker], "kvstore": {**kvstore, "path": kvstore.get("path", "") + name + "/"}}
        leaves.setdefault(int(step.split("_")[1]), {})[what] = ts.open(spec, open=True).result().read().result()
    for step, leaf in leaves.items():
        missing = [what for what in ("logits", "hidden") if what not in leaf]
        if missing:
            raise ValueError(f"{ARRAYS}/{step_key(step)}: no {' or '.join(missing)} array in the orbax tree")
    return {step: (leaf["logits"], leaf["hidden"]) for step, leaf in leaves.items()}


def environment_record() -> dict[str, Any]:
    from kimi_jax.platform_info import platform_fingerprint

    packages = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "KIMI_JAX_", "TF_CPP")) or k in
           ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # fmt: skip
    return {"platform": platform_fingerprint(), "python_executable": sys.executable, "packages": packages,
            "environment": env}  # fmt: skip


def bundle_digest(bundle: Path) -> str:
    return blake3.blake3((Path(bundle) / CHECKSUMS).read_bytes()).hexdigest()


def write_bundle(out: Path, manifest, ledger: dict, steps, anchor_file: Path | None, explorer_html: str | None,
                 tokenizer_dir: Path | None = None) -> Path:  # fmt: skip
    """Assemble the bundle beside ``out`` and move it into place atomically; returns ``out``.

    ``tokenizer_dir`` holds the tokenizer files the ledger names (default: the checkpoint folder;
    a remote checkpoint's are in its local mirror)."""
    out = Path(out)
    work = partial_dir(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json_atomic(work / "manifest.json", manifest.resolved_dict())
    if manifest.source is not None and Path(manifest.source).exists():
        shutil.copyfile(manifest.source, work / "manifest.yaml")
    write_json_atomic(work / "ledger.json", ledger)
    if anchor_file is not None:
        shutil.copyfile(anchor_file, work / "anchor.json")
    if ledger.get("non_perturbation") is not None:
        write_json_atomic(work / "non_perturbation.json", ledger["non_perturbation"])
    write_json_atomic(work / "provenance.json", provenance_map())
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
    write_checksums(work)
    proof = ledger.get("non_perturbation")
    receipt = {
        "receipt_version": BUNDLE_VERSION,
        "bundle_digest": bundle_digest(work),
        "manifest_digest": ledger["manifest_digest"],
        "anchor": None if ledger.get("anchor") is None else {"file": ledger["anchor"]["file"],
                                                              "digest": ledger["anchor"]["anchor_digest"]},  # fmt: skip
        "verdict": {"non_perturbing": bool(proof and proof["identical"]),
                    "anchor_matched": ledger.get("anchor") is not None, "steps": len(ledger["steps"]),
                    "tokens": [s["token"] for s in ledger["steps"]]},  # fmt: skip
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_json_atomic(work / RECEIPT, receipt)
    _swap_into_place(work, out)
    return out


def _swap_into_place(work: Path, out: Path) -> None:
    """Replace ``out`` by ``work``; an existing bundle is only removed once the new one is in place."""
    if not out.exists():
        os.rename(work, out)
        return
    if any(out.iterdir()) and not (out / RECEIPT).exists() and not (out / "ledger.json").exists():
        raise FileExistsError(f"{out}: exists and is not a kimi-jax bundle; refusing to replace it")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)
