"""Per-step checkpoints of a run in progress, so a killed run continues where it stopped.

Each completed step of each run (bare, instrumented) is saved under ``.OUT.work/RUN/`` as
``step_NNNNN.npz`` (logits, hidden state, and with a KV cache the latent caches after the step)
and then ``step_NNNNN.json`` (the rest of the record). The JSON is written last and atomically,
so its presence marks a complete step; anything else is ignored on resume. An existing
``.OUT.work`` is removed only when it holds nothing but what a run saves there
(:func:`holds_only_saved_steps`); anything else beside the output is never deleted. The folder and
its ``identity.json`` are created with the first completed step: a run that fails before any step
completes (a digest mismatch, an anchor that does not fit) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kimi_jax.errors import CheckpointError, OutputError, ResumeError
from kimi_jax.fileio import read_json, write_bytes_atomic, write_failure, write_json_atomic
from kimi_jax.model.layers import LatentCache
from kimi_jax.records import ByteCounts, LayerRecord, StepRecord


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


RUNS = ("bare", "instrumented")
_SAVED = re.compile(r"(step_\d{5,}\.(json|npz)|\.step_\d{5,}\.(json|npz)\.tmp-\w+)")


def holds_only_saved_steps(root: Path) -> bool:
    """Whether ``root`` is a real folder holding nothing but a run's saved steps (identity.json,
    and per run step_NNNNN.json/.npz and their temp files)."""
    if root.is_symlink() or not root.is_dir():
        return False
    for entry in os.scandir(root):
        if entry.name in RUNS and entry.is_dir(follow_symlinks=False):
            if not all(f.is_file(follow_symlinks=False) and _SAVED.fullmatch(f.name) for f in os.scandir(entry.path)):
                return False
        elif not (entry.is_file(follow_symlinks=False) and re.fullmatch(r"\.?identity\.json(\.tmp-\w+)?",
                                                                         entry.name)):  # fmt: skip
            return False
    return True


def check_finite(run: str, step: StepRecord) -> None:
    """A step whose activations are not finite stops the run, naming the first layer whose input or
    output norm is NaN or infinite (an instrumented run measures them), else what is not finite."""
    where = f"step {step.index} of the {run} run"
    for rec in step.layers:
        for what, value in (("input", rec.norm_in), ("output", rec.norm_out)):
            if value is not None and not math.isfinite(value):
                raise CheckpointError(f"{where}: layer {rec.layer}'s {what} is not finite (its norm is {value}); the "
                                      "checkpoint's weights hold NaN or infinite values, or the activations overflow "
                                      "the compute dtype")  # fmt: skip
    for what, values in (("hidden state after the last layer", step.hidden), ("logits", step.logits)):
        if values is not None and not np.isfinite(np.asarray(values, np.float32)).all():
            named = "" if any(r.norm_out is not None for r in step.layers) else \
                " (a run with capture, the instrumented run of `kimi-jax run --no-prove`, names the first such layer)"  # fmt: skip
            raise CheckpointError(f"{where}: the {what} is not finite; the checkpoint's weights hold NaN or infinite "
                                  f"values, or the activations overflow the compute dtype{named}")  # fmt: skip


class RunCheckpoints:
    def __init__(self, out: Path, identity: dict, resume: bool):
        self.root = work_dir(Path(out))
        self.identity = identity
        ident_file = self.root / "identity.json"
        self.started = resume and ident_file.exists()  # the folder holds this run's identity
        if self.started:
            saved = read_json(ident_file, 1 << 20, "saved run identity", ResumeError)
            if saved != identity:
                diffs = [k for k in identity if saved.get(k) != identity[k]]
                raise ResumeError(f"{self.root}: saved steps belong to a different run (differs in {diffs}); "
                                  "remove it or run without --resume")  # fmt: skip
        else:
            if (self.root.exists() or self.root.is_symlink()) and not holds_only_saved_steps(self.root):
                raise OutputError(f"{self.root}: not removed: a run keeps its completed steps there, but this holds "
                                  "other files; move it away")  # fmt: skip
            if self.root.exists():
                with self._writing("remove the steps saved by an earlier run"):
                    shutil.rmtree(self.root)

    @contextlib.contextmanager
    def _writing(self, what: str):
        try:
            yield
        except OSError as e:
            reason = write_failure(e)
            if reason is None:
                raise
            raise OutputError(f"{self.root}: cannot {what}: {reason}. The steps saved before are kept: once that is "
                              "fixed, run the same command with --resume") from None  # fmt: skip

    def save(self, run: str, step: StepRecord) -> None:
        check_finite(run, step)  # as soon as a step is done: a NaN would otherwise surface only in the ledger
        with self._writing(f"save step {step.index} of the {run} run"):
            self._save(run, step)

    def _save(self, run: str, step: StepRecord) -> None:
        if not self.started:
            self.root.mkdir(parents=True)
            write_json_atomic(self.root / "identity.json", self.identity)
            self.started = True
        folder = self.root / run
        folder.mkdir(exist_ok=True)
        # float32 holds bfloat16 values exactly, and npz cannot store bfloat16 itself
        arrays = {"logits": np.asarray(step.logits, np.float32), "hidden": np.asarray(step.hidden, np.float32)}
        for i, cache in enumerate(step.caches or []):
            arrays[f"cache_{i}_c_kv"] = np.asarray(cache.c_kv, np.float32)
            arrays[f"cache_{i}_k_pe"] = np.asarray(cache.k_pe, np.float32)
            arrays[f"cache_{i}_length"] = np.asarray(cache.length)
            arrays["cache_dtype"] = np.asarray(str(cache.c_kv.dtype))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes_atomic(folder / f"step_{step.index:05d}.npz", buf.getvalue())
        record = {k: v for k, v in dataclasses.asdict(step).items() if k not in ("logits", "hidden", "caches")}
        record["bytes_per_layer"] = [[k, v] for k, v in step.bytes_per_layer.items()]
        write_json_atomic(folder / f"step_{step.index:05d}.json", record)

    def load(self, run: str) -> tuple[list[StepRecord], list | None]:
        """The completed steps of ``run`` (consecutive from 0) and the caches after the last one."""
        steps, caches = [], None
        while (json_file := self.root / run / f"step_{len(steps):05d}.json").exists():
            record = read_json(json_file, 1 << 30, "saved step", ResumeError)
            with np.load(json_file.with_suffix(".npz")) as z:
                arrays = {k: z[k] for k in z.files}
            layers = [LayerRecord(**{**layer, "io": ByteCounts(**layer["io"])}) for layer in record.pop("layers")]
            record["bytes_per_layer"] = {k: v for k, v in record["bytes_per_layer"]}
            record["io"] = ByteCounts(**record["io"])
            steps.append(StepRecord(**record, layers=layers, logits=arrays["logits"], hidden=arrays["hidden"]))
            n = sum(1 for k in arrays if k.endswith("_length"))
            dtype = jnp.dtype(str(arrays["cache_dtype"])) if n else None
            caches = [LatentCache(jnp.asarray(arrays[f"cache_{i}_c_kv"]).astype(dtype),
                                        jnp.asarray(arrays[f"cache_{i}_k_pe"]).astype(dtype),
                                        jnp.asarray(arrays[f"cache_{i}_length"])) for i in range(n)] or None  # fmt: skip
        return steps, caches

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
