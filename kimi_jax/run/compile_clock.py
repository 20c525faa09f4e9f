"""Seconds a run spends making programs, from JAX's own monitoring events.

JAX reports a time span for each stage of making a program: tracing the Python function, lowering
it to MLIR, and compiling it with XLA (or loading the executable from the persistent compilation
cache). Spans nest (tracing a function traces the functions it calls), so the seconds of a window
are the length of the union of the spans inside it, not their sum. A step's ``compile_s`` is that
union over the step's wall-clock window: the part of its ``wall_s`` spent making programs rather
than running them. With the persistent compilation cache, a program made before is loaded, not
compiled, but still traced and lowered; :func:`compilations` counts the XLA compilations proper
(the cache's misses).
"""

from __future__ import annotations

import threading
import time

import jax.monitoring

__all__ = ["start", "compile_seconds", "compilations", "now", "record_span"]

# jax._src.dispatch: JAXPR_TRACE_EVENT, JAXPR_TO_MLIR_MODULE_EVENT, BACKEND_COMPILE_EVENT
_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                     "/jax/core/compile/backend_compile_duration"})  # fmt: skip
_KEEP = 4096  # spans remembered; older ones are dropped (a run asks about its latest step only)

_MISS = "/jax/compilation_cache/cache_misses"  # an XLA compilation the persistent cache did not have

_spans: list[tuple[float, float]] = []
_misses: list[float] = []
_lock = threading.Lock()
_started = False


def now() -> float:
    """The clock the spans are on (JAX stamps them with ``time.time``)."""
    return time.time()


def _on_span(event: str, start: float, end: float, **_) -> None:
    if event in _EVENTS:
        record_span(start, end)


def _on_event(event: str, **_) -> None:
    if event == _MISS:
        with _lock:
            _misses.append(time.time())
            if len(_misses) > 2 * _KEEP:
                del _misses[:-_KEEP]


def record_span(start: float, end: float) -> None:
    """A span during which a program was being made (JAX's events call this)."""
    with _lock:
        _spans.append((start, end))
        if len(_spans) > 2 * _KEEP:
            del _spans[:-_KEEP]


def start() -> None:
    """Listen to JAX's compile events from now on (once per process)."""
    global _started
    with _lock:
        if not _started:
            jax.monitoring.register_event_time_span_listener(_on_span)
            jax.monitoring.register_event_listener(_on_event)
            _started = True


def compile_seconds(start: float, end: float) -> float:
    """Seconds within ``[start, end]`` (:func:`now` times) during which a program was being made."""
    with _lock:
        spans = sorted((max(a, start), min(b, end)) for a, b in _spans if b > start and a < end)
    total, reach = 0.0, start
    for a, b in spans:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def compilations(start: float, end: float) -> int:
    """XLA compilations within ``[start, end]``: programs the persistent cache did not have."""
    with _lock:
        return sum(start <= t <= end for t in _misses)
