"""A bundle's files, each loaded once, for verify's checks: JSON through one reader, the orbax
arrays restored on first use, failures as :class:`CheckFailed`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import parse_json, read_regular
from kimi_jax.ledger.bundle import ARRAYS, MAX_JSON_BYTES, step_key
from kimi_jax.ledger.sequences import array_offsets, is_multi, sequence_view
from kimi_jax.verify.report import CheckFailed


class BundleView:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def _memo(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = (True, load())
            except CheckFailed as e:
                self._cache[key] = (False, str(e))
        ok, value = self._cache[key]
        if not ok:
            raise CheckFailed(value)
        return value

    def json(self, name: str) -> Any:
        def load() -> Any:
            path = self.root / name
            if not path.exists() and not path.is_symlink():
                raise CheckFailed(f"{name}: missing from the bundle")
            try:
                return parse_json(read_regular(path, MAX_JSON_BYTES, name), name)
            except KimiJaxError as e:
                raise CheckFailed(self.relative(str(e))) from None

        return self._memo(name, load)

    def relative(self, text: str) -> str:
        """A message with this bundle's folder left out of the paths it names."""
        return text.replace(str(self.root) + os.sep, "")

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    @property
    def ledger(self) -> dict[str, Any]:
        ledger = self.json("ledger.json")
        if not isinstance(ledger, dict):
            raise CheckFailed(f"ledger.json: expected a JSON object, got {type(ledger).__name__}")
        return ledger

    def steps(self) -> list[dict[str, Any]]:
        steps = self.ledger.get("steps")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise CheckFailed("ledger.json: steps: expected a list of step objects")
        return steps

    def arrays(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        def load() -> dict[int, tuple[np.ndarray, np.ndarray]]:
            from kimi_jax.ledger.bundle import load_arrays

            if not (self.root / ARRAYS).is_dir():
                raise CheckFailed(f"{ARRAYS}/: missing from the bundle; expected the orbax tree of per-step arrays")
            indices = self.array_indices()
            try:
                arrays = load_arrays(self.root, [i for i in indices if isinstance(i, int) and not isinstance(i, bool)])
            except KimiJaxError as e:  # declared shapes checked before restoring
                raise CheckFailed(self.relative(str(e))) from None
            except Exception as e:  # orbax raises many kinds on a damaged tree
                raise CheckFailed(f"{ARRAYS}/: cannot restore the orbax tree ({type(e).__name__}: {str(e)[:200]})") from None
            for step, (logits, hidden) in arrays.items():
                for what, a in (("logits", logits), ("hidden", hidden)):
                    if a.dtype != np.float32 or a.ndim != 1:
                        raise CheckFailed(f"{ARRAYS}/{step_key(step)}/{what}: expected a float32 vector, got "
                                    f"{a.dtype}{list(a.shape)}")  # fmt: skip
            return arrays

        return self._memo("arrays", load)

    def array_indices(self) -> list:
        """The arrays the ledger says the bundle holds: each step's index, or for several sequences
        the flat numbering of every sequence's steps (:func:`kimi_jax.ledger.sequences.array_offsets`)."""
        ledger = self.ledger
        if is_multi(ledger):
            try:
                return list(range(sum(len(s["steps"]) for s in ledger["sequences"])))
            except (KeyError, TypeError):
                raise CheckFailed("ledger.json: sequences: expected a list of sequences, each with its steps") from None
        return [s.get("index") for s in self.steps()]

    def sequences(self) -> list[BundleView]:
        """The bundle as each sequence's own (one view: itself, for a one-sequence bundle)."""
        ledger = self.ledger
        if not is_multi(ledger):
            return [self]
        if not isinstance(ledger.get("sequences"), list):
            raise CheckFailed("ledger.json: sequences: expected a list of sequences")
        return [SequenceView(self, i) for i in range(len(ledger["sequences"]))]

    def tokenizer(self):
        """The tokenizer from the bundle's ``tokenizer/`` copies, checked against the ledger's digests;
        None when the ledger records none. Its vocabulary size is the stored logits'."""

        def load():
            from kimi_jax.errors import TokenizerError
            from kimi_jax.ledger.bundle import TOKENIZER
            from kimi_jax.text.sandbox import clip
            from kimi_jax.text.tokenizer import file_digests, files_digest, load_tokenizer

            recorded = (self.ledger.get("checkpoint") or {}).get("tokenizer")
            if recorded is None:
                return None
            folder = self.root / TOKENIZER
            files = recorded.get("files") or {}
            if not isinstance(files, dict):
                raise CheckFailed("ledger.json: checkpoint.tokenizer.files: expected {file name: BLAKE3}")
            try:
                found = file_digests(folder) if folder.is_dir() else {}
            except TokenizerError as e:
                raise CheckFailed(self.relative(str(e))) from None
            problems = [f"{TOKENIZER}/{clip(n, 60)}: BLAKE3 {found.get(n, '<missing>')}, the ledger records "
                        f"{clip(str(d), 70)}" for n, d in files.items() if found.get(n) != d]  # fmt: skip
            problems += [f"{TOKENIZER}/{n}: present but not in the ledger's tokenizer files" for n in found if n not in files]
            if files_digest(files) != recorded.get("digest"):
                problems.append(f"checkpoint.tokenizer.digest is {clip(str(recorded.get('digest')), 70)}, but its "
                                f"files give {files_digest(files)}")  # fmt: skip
            if problems:
                raise CheckFailed("; ".join(problems))
            arrays = self.arrays()
            vocab = next(iter(arrays.values()))[0].size if arrays else None
            try:
                tokenizer = load_tokenizer(folder, vocab)
            except TokenizerError as e:
                raise CheckFailed(self.relative(str(e))) from None
            if tokenizer is None or tokenizer.kind != recorded.get("kind"):
                raise CheckFailed(f"{TOKENIZER}/: does not hold a {recorded.get('kind')} tokenizer")
            return tokenizer

        return self._memo("tokenizer", load)

    def step_arrays(self) -> tuple[list[dict[str, Any]], dict[int, tuple[np.ndarray, np.ndarray]], list[str]]:
        """Ledger steps, stored arrays, and problems with how the two line up."""
        steps, arrays = self.steps(), self.arrays()
        indices = [s.get("index") for s in steps]
        problems = [f"{ARRAYS}/{step_key(i)}: stored for a step the ledger does not have" for i in sorted(arrays)
                    if i not in indices]  # fmt: skip
        problems += [f"steps[{i}]: no stored arrays ({ARRAYS}/{step_key(i) if isinstance(i, int) else i} missing)"
                     for i in indices if i not in arrays]  # fmt: skip
        return steps, arrays, problems


class SequenceView(BundleView):
    """Sequence ``index`` of a multi-sequence bundle as the bundle of its own run: the version-2
    ledger of its run (:func:`~kimi_jax.ledger.sequences.sequence_view`), its arrays under its own
    step indices, its proof; the anchor belongs to sequence 0 (its step 0 is the anchor step); every
    other file is the bundle's. Checks of one-sequence bundles run on it unchanged."""

    def __init__(self, parent: BundleView, index: int) -> None:
        super().__init__(parent.root)
        self.parent, self.index = parent, index

    @property
    def ledger(self) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            try:
                return sequence_view(self.parent.ledger, self.index)
            except (KeyError, TypeError, IndexError) as e:
                raise CheckFailed(f"ledger.json: sequences[{self.index}]: not a sequence's record ({e})") from None

        return self._memo("ledger", load)

    def json(self, name: str) -> Any:
        if name != "non_perturbation.json":
            return self.parent.json(name)
        proofs = self.parent.json(name)
        if not isinstance(proofs, list) or len(proofs) <= self.index:
            raise CheckFailed(f"{name}: expected a list of each sequence's proof")
        return proofs[self.index]

    def has(self, name: str) -> bool:
        if name == "anchor.json":
            return self.index == 0 and self.parent.has(name)
        if name == "non_perturbation.json":
            return self.parent.has(name) and self.json(name) is not None
        return self.parent.has(name)

    def array_indices(self) -> list:
        return [s.get("index") for s in self.steps()]

    def arrays(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        def load() -> dict[int, tuple[np.ndarray, np.ndarray]]:
            every = self.parent.arrays()
            offset = array_offsets(self.parent.ledger)[self.index]
            return {j: every[offset + j] for j in range(len(self.steps())) if offset + j in every}

        return self._memo("arrays", load)

    def tokenizer(self):
        return self.parent.tokenizer()
