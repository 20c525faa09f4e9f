"""How verify reports: each check's outcome, and the exceptions a check raises to fail or skip."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

MAX_SHOWN = 5


class CheckFailed(Exception):
    """A check found a problem; the message says what and where."""


class CheckSkipped(Exception):
    """A check does not apply to this bundle; the message says why."""


def join_problems(problems: list[str]) -> str:
    shown = problems[:MAX_SHOWN]
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
        return f"{self.number}. {self.name}: {self.status}: {self.reason}"


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
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        # a ledger or record whose structure is not what the schema says (reported by check 3)
        return Check(number, name, FAILED, f"unexpected structure in the bundle's JSON ({type(e).__name__}: {e})")
