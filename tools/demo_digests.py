"""Does a change keep the demo's numbers? Run ``manifests/demo.yaml`` at a git revision and in the
working tree, and compare per step the token, the hidden and logits digests and the bytes read.

    python tools/demo_digests.py 5b0b83b        # exit 0: bitwise the same; 1: a difference
    python tools/demo_digests.py 5b0b83b --set compute.dequant=bf16-rounded   # overrides for the working tree

``--set`` applies to the working tree's run only: a change that makes a result-changing setting
explicit (exact dequantization, which kimi-jax 0.1.0 did not do) can still be checked against a
revision from before it, with the setting that reproduces the old behaviour.

The revision is checked out with ``git worktree add`` into a temporary folder (removed afterwards)
and each tree runs in its own Python process with ``PYTHONPATH`` at that tree, so each imports its
own ``kimi_jax``. Each tree also writes the demo's synthetic checkpoint itself (``kimi-jax synth``),
and every file of the two must be byte-identical, so a change to the generator shows too. The demo
runs themselves share the usual cache (``$KIMI_JAX_CACHE``, else ``~/.cache/kimi-jax``): with
identical checkpoints that changes nothing, and it keeps JAX's compilation cache warm. The runs
skip the bare-vs-instrumented proof (``--no-prove``): the digests compared here are the
instrumented run's, which the proof shows equal to the bare run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import blake3
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = "manifests/demo.yaml"
COMPARED = ("token", "hidden_digest", "logits_digest", "bytes_read")
MODEL_FILES = ("config.json", "model.safetensors.index.json")  # beside the *.safetensors shards


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A detached worktree of ``revision``, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="kimi-jax-demo-digests-") as tmp:
        tree = Path(tmp) / "tree"
        git("worktree", "add", "--detach", "--quiet", str(tree), revision)
        try:
            yield tree
        finally:
            git("worktree", "remove", "--force", str(tree))


def kimi_jax(tree: Path, *args: str) -> None:
    """``kimi-jax ARGS`` with ``tree``'s package, in ``tree``."""
    proc = subprocess.run([sys.executable, "-m", "kimi_jax.cli", *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"kimi-jax {' '.join(args)} failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def synth_files(tree: Path, out: Path) -> dict[str, str]:
    """{relative path: BLAKE3} of the files of the demo's synthetic checkpoint, as ``tree`` writes it,
    that hold the model: shards, config.json and the shard index (the generator's own record and the
    tokenizer files it ships since generator version 3 do not change a number)."""
    spec = yaml.safe_load((tree / DEMO).read_text(encoding="utf-8"))["model"]["synthetic"]
    kimi_jax(tree, "synth", "--preset", spec["preset"], "--layout", spec["layout"], "--seed", str(spec["seed"]),
             "--out", str(out))  # fmt: skip
    return {p.relative_to(out).as_posix(): blake3.blake3(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and (p.suffix == ".safetensors" or p.name in MODEL_FILES)}  # fmt: skip


def demo_steps(tree: Path, out: Path, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Run ``tree``'s demo manifest (``--set`` each override) with ``tree``'s package into ``out``;
    the compared fields per step."""
    kimi_jax(tree, "run", DEMO, "--out", str(out), "--no-prove", *(a for o in overrides for a in ("--set", o)))
    ledger = json.loads((out / "ledger.json").read_text(encoding="utf-8"))
    return [{field: step[field] for field in COMPARED} for step in ledger["steps"]]


def differences(before: list[dict], after: list[dict]) -> list[str]:
    problems = [f"step {i} {field}: {a[field]!r} -> {b[field]!r}"
                for i, (a, b) in enumerate(zip(before, after)) for field in COMPARED if a[field] != b[field]]  # fmt: skip
    if len(before) != len(after):
        problems.append(f"{len(before)} steps -> {len(after)} steps")
    return problems


def file_differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [f"checkpoint file {name}: " + ("missing" if name not in after else "new" if name not in before else
                                           "different bytes")
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]  # fmt: skip


def compare_demo(revision: str, work: Path,
                 overrides: tuple[str, ...] = ()) -> tuple[list[dict], list[dict], list[str]]:  # fmt: skip
    """(steps at ``revision``, steps in the working tree run with ``overrides``, differences); the
    bundles are left in ``work/revision`` and ``work/working-tree``."""
    with checkout(revision) as tree:
        files_before = synth_files(tree, work / "revision-checkpoint")
        before = demo_steps(tree, work / "revision")
    files_after = synth_files(REPO, work / "working-tree-checkpoint")
    after = demo_steps(REPO, work / "working-tree", overrides)
    return before, after, file_differences(files_before, files_after) + differences(before, after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="git revision to compare the working tree with (e.g. 5b0b83b)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="manifest override for the working tree's run (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kimi-jax-demo-runs-") as tmp:
        before, after, problems = compare_demo(args.revision, Path(tmp), tuple(args.overrides))
    print(f"{'step':>4}  {'token':>6}  {'hidden digest':<16}  {'logits digest':<16}  {'bytes read':>12}")
    for i, step in enumerate(after):
        print(f"{i:>4}  {step['token']:>6}  {step['hidden_digest'][:16]}  {step['logits_digest'][:16]}  "
              f"{step['bytes_read']:>12,}")  # fmt: skip
    if problems:
        print(f"DIFFERENT from {args.revision}:\n  " + "\n  ".join(problems))
        return 1
    print(f"identical to {args.revision} ({git('rev-parse', '--short', args.revision)}): the synthetic checkpoint's "
          f"files, and the tokens, hidden and logits digests and bytes read of all {len(after)} steps")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
