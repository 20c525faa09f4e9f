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
import zipfile
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
# a run's steps; a run of shared passes (prompts:) saves its passes and the caches after the latest
_SAVED = re.compile(r"\.?((step|pass)_\d{5,}\.(json|npz)|caches_[01]\.npz)(\.tmp-\w+)?")


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

    def _folder(self, run: str) -> Path:
        """The folder of ``run``'s saved steps, made (with the identity beside it) on first use."""
        if not self.started:
            self.root.mkdir(parents=True)
            write_json_atomic(self.root / "identity.json", self.identity)
            self.started = True
        folder = self.root / run
        folder.mkdir(exist_ok=True)
        return folder

    def _save(self, run: str, step: StepRecord) -> None:
        folder = self._folder(run)
        # float32 holds bfloat16 values exactly, and npz cannot store bfloat16 itself
        arrays = {"logits": np.asarray(step.logits, np.float32), "hidden": np.asarray(step.hidden, np.float32),
                  **_cache_arrays(step.caches or [])}  # fmt: skip
        _write_npz(folder / f"step_{step.index:05d}.npz", arrays)
        write_json_atomic(folder / f"step_{step.index:05d}.json", _step_json(step))

    def load(self, run: str) -> tuple[list[StepRecord], list | None]:
        """The completed steps of ``run`` (consecutive from 0) and the caches after the last one."""
        steps, caches = [], None
        while (json_file := self.root / run / f"step_{len(steps):05d}.json").exists():
            record = read_json(json_file, 1 << 30, "saved step", ResumeError)
            arrays = _read_npz(json_file.with_suffix(".npz"))
            with _as_saved(json_file):
                steps.append(_step_from(record, arrays["logits"], arrays["hidden"]))
                caches = _caches_from(arrays, LatentCache)
        return steps, caches

    # -- a run of shared passes (prompts:): a pass at a time -------------------------------------

    def save_pass(self, run: str, state, made: list) -> None:
        """The latest pass of a batch (:class:`~kimi_jax.model.batch.BatchState` after it): the steps it
        ``made`` ((sequence, step) pairs; ``pass_NNNNN``), and the live sequences' caches after it
        (``caches_K.npz``, K the pass's parity, written first, so the caches after the last complete
        pass survive a kill)."""
        record = state.passes[-1]
        for _, step in made:
            check_finite(run, step)
        with self._writing(f"save pass {record.index} of the {run} run"):
            folder = self._folder(run)
            caches = _cache_arrays(state.caches or [] if state.live else [])
            _write_npz(folder / f"caches_{record.index % 2}.npz", {"pass": np.asarray(record.index), **caches})
            arrays = {}
            for k, (_, step) in enumerate(made):
                arrays.update({f"logits_{k}": np.asarray(step.logits, np.float32), f"hidden_{k}": np.asarray(step.hidden, np.float32)})
            _write_npz(folder / f"pass_{record.index:05d}.npz", arrays)
            write_json_atomic(folder / f"pass_{record.index:05d}.json", {
                "pass": {**dataclasses.asdict(record), "io": dataclasses.asdict(record.io)},
                "made": [[i, _step_json(step)] for i, step in made], "live": list(state.live),
            })  # fmt: skip

    def load_passes(self, run: str):
        """The :class:`~kimi_jax.model.batch.BatchState` after the last complete pass saved for ``run``,
        or None when none was."""
        from kimi_jax.model.batch import BatchState, PassRecord
        from kimi_jax.model.layers import BatchedLatentCache

        steps: list[list[StepRecord]] = []
        passes, live = [], []
        while (json_file := self.root / run / f"pass_{len(passes):05d}.json").exists():
            saved = read_json(json_file, 1 << 30, "saved pass", ResumeError)
            arrays = _read_npz(json_file.with_suffix(".npz"))
            with _as_saved(json_file):
                record = saved["pass"]
                passes.append(PassRecord(**{**record, "sequences": tuple(record["sequences"]),
                                            "io": ByteCounts(**record["io"]),
                                            "drafted": None if record["drafted"] is None else tuple(record["drafted"])}))  # fmt: skip
                for k, (i, step) in enumerate(saved["made"]):
                    while len(steps) <= int(i):
                        steps.append([])
                    steps[int(i)].append(_step_from(step, arrays[f"logits_{k}"], arrays[f"hidden_{k}"]))
                live = [int(i) for i in saved["live"]]
        if not passes:
            return None
        caches_file = self.root / run / f"caches_{(len(passes) - 1) % 2}.npz"
        arrays = _read_npz(caches_file)
        with _as_saved(caches_file):
            if int(arrays["pass"]) != len(passes) - 1:
                raise ResumeError(f"{self.root / run}: the caches saved do not belong to pass {len(passes) - 1}, the "
                                  "last complete one; remove the folder and run without --resume")  # fmt: skip
            return BatchState(steps, live, _caches_from(arrays, BatchedLatentCache), passes)

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _cache_arrays(caches: list) -> dict[str, np.ndarray]:
    """A run's latent caches (one per layer, batched or not) as npz arrays; float32 holds bfloat16 exactly."""
    arrays = {}
    for i, cache in enumerate(caches):
        arrays.update({f"cache_{i}_c_kv": np.asarray(cache.c_kv, np.float32), f"cache_{i}_k_pe": np.asarray(cache.k_pe, np.float32),
                       f"cache_{i}_length": np.asarray(cache.length), "cache_dtype": np.asarray(str(cache.c_kv.dtype))})  # fmt: skip
    return arrays


def _caches_from(arrays: dict[str, np.ndarray], kind) -> list | None:
    """The caches :func:`_cache_arrays` saved, as ``kind`` (LatentCache or BatchedLatentCache); None if none."""
    n = sum(1 for k in arrays if k.endswith("_length"))
    dtype = jnp.dtype(str(arrays["cache_dtype"])) if n else None
    return [kind(jnp.asarray(arrays[f"cache_{i}_c_kv"]).astype(dtype), jnp.asarray(arrays[f"cache_{i}_k_pe"]).astype(dtype),
                 jnp.asarray(arrays[f"cache_{i}_length"])) for i in range(n)] or None  # fmt: skip


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a saved step or pass; one that cannot be read (truncated, missing) is named."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ResumeError(f"{path}: the saved arrays cannot be read ({type(e).__name__}: {str(e)[:200]}); remove "
                          f"{path.parent.parent} and run without --resume") from None  # fmt: skip


def _write_npz(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def _step_json(step: StepRecord) -> dict:
    """A step's record but its arrays (saved beside it), as JSON."""
    record = {k: v for k, v in dataclasses.asdict(step).items() if k not in ("logits", "hidden", "caches")}
    record["bytes_per_layer"] = [[k, v] for k, v in step.bytes_per_layer.items()]
    return record


@contextlib.contextmanager
def _as_saved(path: Path):
    """A saved file that is not what a run saves (edited by hand, or another version's) is a named
    error, not an internal one; the saved files are kept."""
    try:
        yield
    except ResumeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ResumeError(f"{path}: not what this kimi-jax saves ({type(e).__name__}: {str(e)[:200]}); remove "
                          f"{path.parent.parent} and run without --resume") from None


def _step_from(record: dict, logits: np.ndarray, hidden: np.ndarray) -> StepRecord:
    record = dict(record)
    layers = [LayerRecord(**{**layer, "io": ByteCounts(**layer["io"])}) for layer in record.pop("layers")]
    record["bytes_per_layer"] = {k: v for k, v in record["bytes_per_layer"]}
    record["io"] = ByteCounts(**record["io"])
    return StepRecord(**record, layers=layers, logits=logits, hidden=hidden)
