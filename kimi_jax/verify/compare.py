"""``kimi-jax compare A B``: what two manifests should produce
(:mod:`kimi_jax.verify.compare_manifests`), or where two bundles differ
(:mod:`kimi_jax.verify.compare_bundles`), and the report of either."""

from __future__ import annotations

import os
from pathlib import Path

from kimi_jax.ledger.archive import is_archive
from kimi_jax.ledger.bundle import RECEIPT
from kimi_jax.verify.compare_bundles import BundleComparison, CompareError, compare_bundles
from kimi_jax.verify.compare_manifests import ManifestComparison, compare_manifests

__all__ = ["compare_paths", "format_comparison", "CompareError"]


def _is_bundle(path: str) -> bool:
    p = Path(path)
    return p.is_dir() or p.name == RECEIPT or is_archive(p)


def compare_paths(a: str | os.PathLike, b: str | os.PathLike) -> ManifestComparison | BundleComparison:
    """Two manifest files -> :func:`compare_manifests`; two bundles -> :func:`compare_bundles`."""
    a, b = os.fspath(a), os.fspath(b)
    for p in (a, b):
        if not Path(p).exists():
            raise CompareError(f"{p}: does not exist; expected two manifest files or two run bundles")
    kinds = [_is_bundle(a), _is_bundle(b)]
    if all(kinds):
        return compare_bundles(a, b)
    if not any(kinds):
        return compare_manifests(a, b)
    bundle, manifest = (a, b) if kinds[0] else (b, a)
    raise CompareError(f"cannot compare a bundle ({bundle}) with a manifest ({manifest}); expected two manifest "
                       "files or two run bundles")  # fmt: skip


# -- reports ------------------------------------------------------------------------------------


def _section(title: str, items: list[str], empty: str | None = None) -> list[str]:
    """A titled, indented list, or one line saying there is nothing (``TITLE: none`` unless ``empty``)."""
    if not items:
        return [empty or f"{title}: none"]
    return [f"{title}:", *(f"  {item}" for item in items)]


def _explained(differences: list) -> list[str]:
    """Each difference on its line, and why it matters once after a run of differences that share the reason
    (the storage settings, say)."""
    lines = []
    for i, d in enumerate(differences):
        lines.append(d.describe())
        if i + 1 == len(differences) or differences[i + 1].why != d.why:
            lines.append(f"  ({d.why})")
    return lines


def _format_manifest(c: ManifestComparison, heading: bool = True) -> list[str]:
    lines = [f"manifests: A = {c.a}", f"           B = {c.b}"] if heading else []
    lines += _section("differences that can change results", _explained(c.result_differences))
    lines += _section("differences that cannot change results", _explained(c.neutral_differences))
    lines += [f"note: {n}" for n in c.notes]
    return lines


def _fmt_float(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def _format_bundles(c: BundleComparison) -> list[str]:
    lines = [f"bundles: A = {c.a} ({c.steps_a} steps)", f"         B = {c.b} ({c.steps_b} steps)",
             f"{'seq:step' if any(s.sequence is not None for s in c.steps) else 'step':>4}  {'token A':>8}  {'token B':>8}  {'context':<8} {'hidden':<8} {'logits':<8} "
             f"{'max|dlogits|':>12}  {'max|dhidden|':>12}  {'bytes A':>12}  {'bytes B':>12}"]  # fmt: skip
    for s in c.steps:
        same = {k: "equal" if v else "DIFFERS" for k, v in (("context", s.context_equal),
                                                               ("hidden", s.hidden_equal), ("logits", s.logits_equal))}
        lines.append(f"{s.label:>4}  {s.token_a!s:>8}  {s.token_b!s:>8}  {same['context']:<8} "
                     f"{same['hidden']:<8} {same['logits']:<8} "
                     f"{_fmt_float(s.max_abs_logits):>12}  {_fmt_float(s.max_abs_hidden):>12}  "
                     f"{s.bytes_read_a!s:>12}  {s.bytes_read_b!s:>12}")  # fmt: skip
    if c.first_divergent_step is None:
        lines.append("first divergent step: none" + ("" if c.steps_a == c.steps_b else " among the common steps"))
    else:
        of = "" if c.first_divergent_sequence is None else f" of sequence {c.first_divergent_sequence}"
        lines.append(f"first divergent step: {c.first_divergent_step}{of}")
        if c.first_divergent_layer is not None:
            lines.append(f"first layer where norms differ in step {c.first_divergent_step}: layer "
                         f"{c.first_divergent_layer} ({c.layer_detail})")  # fmt: skip
        else:
            lines.append(f"first layer where norms differ in step {c.first_divergent_step}: none ({c.layer_detail})")
        if c.first_expert_layer is not None:
            lines.append(f"first layer where the selected experts differ: layer {c.first_expert_layer}")
    lines += _section("platform differences", c.platform_differences, empty="platform: identical")
    if c.software_differences:
        lines += _section("software differences", c.software_differences)
    lines += _format_manifest(c.manifest, heading=False)
    lines.append(f"expected from the manifests: {c.manifest.verdict}")
    lines += [f"note: {n}" for n in c.notes]
    return lines


def format_comparison(c: ManifestComparison | BundleComparison) -> str:
    if isinstance(c, ManifestComparison):
        return "\n".join([*_format_manifest(c), f"verdict: {c.verdict}"])
    verdict = "IDENTICAL: every step's tokens and hidden/logits digests are equal" if c.identical else "DIFFERENT"
    return "\n".join([*_format_bundles(c), f"verdict: {verdict}"])
