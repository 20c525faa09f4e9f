"""How verify reports: each check's outcome, and the exceptions a check raises to fail or skip."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from kimi_jax.errors import KimiJaxError

MAX_SHOWN = 5
MAX_PROBLEM = 600  # characters of one problem as reported (it may quote a stranger's file)


class CheckFailed(Exception):
    """A check found a problem; the message says what and where."""


class CheckSkipped(Exception):
    """A check does not apply to this bundle; the message says why."""


def clip(text: str, limit: int = MAX_PROBLEM) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def join_problems(problems: list[str]) -> str:
    shown = [clip(p) for p in problems[:MAX_SHOWN]]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")


def require(problems: list[str]) -> None:
    if problems:
        raise CheckFailed(join_problems(problems))


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


OK, FAILED, SKIPPED = "OK", "FAILED", "SKIPPED"


class Check(NamedTuple):
    number: int
    name: str
    status: str  # OK | FAILED | SKIPPED
    reason: str  # why it failed or was skipped; for OK an optional note

    def line(self) -> str:
        if self.status == OK:
            return f"{self.number}. {self.name}: OK" + (f" ({self.reason})" if self.reason else "")
        return f"{self.number}. {self.name}: {self.status}: {clip(self.reason, MAX_SHOWN * (MAX_PROBLEM + 2))}"


class Report:
    """The outcome of :func:`verify_bundle`: ``checks`` in order, ``ok`` when none FAILED (and some ran)."""

    def __init__(self, source: str, bundle: str, checks: list[Check]) -> None:
        self.source, self.bundle, self.checks = source, bundle, checks

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status != FAILED for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAILED]

    def status(self, name: str) -> str:
        for c in self.checks:
            if c.name == name:
                return c.status
        raise KeyError(f"no check named {name!r}; the checks are {[c.name for c in self.checks]}")

    def reason(self, name: str) -> str:
        return next(c.reason for c in self.checks if c.name == name)

    def summary(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, SKIPPED, FAILED)}
        if not self.checks:
            return f"{self.bundle}: NOT VERIFIED: no checks ran"
        if self.ok:
            return (f"{self.bundle}: VERIFIED ({counts[OK]} OK, {counts[SKIPPED]} SKIPPED, 0 FAILED)")
        return (f"{self.bundle}: NOT VERIFIED: {counts[FAILED]} of {len(self.checks)} checks FAILED "
                f"({', '.join(self.failed)})")  # fmt: skip

    def format(self) -> str:
        return "\n".join([*(c.line() for c in self.checks), self.summary()])


def run_check(number: int, name: str, fn: Callable[[Any], str], bundle: Any) -> Check:
    """Run one check on a bundle view: its note (OK), or why it was SKIPPED or FAILED."""
    try:
        note = fn(bundle)
        return Check(number, name, OK, note or "")
    except CheckSkipped as e:
        return Check(number, name, SKIPPED, str(e))
    except CheckFailed as e:
        return Check(number, name, FAILED, str(e))
    except KimiJaxError as e:  # a named error reading a stranger's bundle is a failed check, never an exit
        return Check(number, name, FAILED, bundle.relative(str(e)) if hasattr(bundle, "relative") else str(e))
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        # a ledger or record whose structure is not what the schema says (reported by check 3)
        return Check(number, name, FAILED, f"unexpected structure in the bundle's JSON ({type(e).__name__}: {e})")


# -- differences between JSON values ---------------------------------------------------------


def first_difference(a: Any, b: Any, here: str) -> str | None:
    diffs = differences(a, b, here, limit=1)
    return diffs[0][0] if diffs else None


def differences(a: Any, b: Any, here: str, limit: int = 20, skip: Callable[[str], bool] | None = None,
                out: list | None = None, into_lists: bool = True) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """``(path, a value, b value)`` where two JSON values differ, depth first, at most ``limit``. A key
    on one side only is one difference (``"<absent>"`` on the other); lists of equal length are
    compared item by item (``path[n]``) unless ``into_lists`` is false."""
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
                differences(a[key], b[key], path, limit, skip, out, into_lists)
            if len(out) >= limit:
                break
    elif into_lists and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for n, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{here}[{n}]", limit, skip, out, into_lists)
            if len(out) >= limit:
                break
    elif a != b or isinstance(a, bool) != isinstance(b, bool):
        out.append((here, a, b))
    return out


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
