"""Multi-process runs: ``jax.distributed`` from the manifest or the environment, and failing fast.

Every process runs the same manifest. The coordinator address and the process count are usually
written in the manifest's ``distributed`` section and the process id given per host, in the
environment or with ``--set distributed.process_id=N``. A field set in both places must agree.

A run must never hang on a dead peer. Three things hold that:

* connecting: ``jax.distributed.initialize`` gives up after ``timeout_s``;
* a peer that dies mid-collective closes its connections, and the collective fails at once in the
  survivors; :func:`fail_fast` turns that into :class:`PeerProcessLost`;
* a peer that stops without closing anything (a hung host, a cut network) is caught by the
  :class:`Watchdog`: no layer finished for ``timeout_s`` means the run cannot go on.

Either way the error is printed as one line and the process exits at once (code 3): the orderly
``jax.distributed`` shutdown waits for every peer, so it is skipped when one is gone. Process 0
hosts the coordination service, and when it dies jaxlib aborts the others from its own threads;
a run started from the command line is therefore supervised by the process the user started
(:mod:`kimi_jax.run.supervisor`), which turns that abort into the same line and exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping

from kimi_jax.errors import KimiJaxError, ManifestError
from kimi_jax.run.supervisor import started_from_the_cli, supervise, supervised

ENVIRONMENT = {"coordinator": "KIMI_JAX_COORDINATOR", "num_processes": "KIMI_JAX_NUM_PROCESSES",
               "process_id": "KIMI_JAX_PROCESS_ID"}  # fmt: skip
EXIT_PEER_LOST = 3


class DistributedError(KimiJaxError):
    """The processes of a multi-process run could not start together."""


class PeerProcessLost(KimiJaxError):
    """Another process of a multi-process run died or stopped responding."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator: str
    num_processes: int
    process_id: int
    timeout_s: float


def settings_from(manifest, environ: Mapping[str, str] = os.environ) -> DistributedSettings | None:
    """The run's distributed settings (manifest, filled from the environment), or None for one process."""
    section = manifest.distributed
    values = {key: getattr(section, key) if section is not None else None for key in ENVIRONMENT}
    problems = []
    for key, var in ENVIRONMENT.items():
        text = environ.get(var)
        if text is None or text == "":
            continue
        value: str | int = text
        if key != "coordinator":
            if not text.isdigit():
                problems.append(manifest.error(f"distributed.{key}", f"${var} must be a non-negative integer, got {text!r}"))
                continue
            value = int(text)
        if values[key] is not None and values[key] != value:
            problems.append(manifest.error(f"distributed.{key}", f"the manifest says {values[key]!r} but ${var} says "
                                                                 f"{value!r}; set it in one place"))  # fmt: skip
        values[key] = value
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    if all(v is None for v in values.values()):
        return None
    for key, var in ENVIRONMENT.items():
        if values[key] is None:
            problems.append(manifest.error(f"distributed.{key}", f"a multi-process run needs it: set it in the manifest "
                                                                 f"or in ${var}"))  # fmt: skip
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    if not 0 <= values["process_id"] < values["num_processes"]:
        raise manifest.error("distributed.process_id", f"process id {values['process_id']} is not in "
                                                       f"0..{values['num_processes'] - 1} (num_processes {values['num_processes']})")  # fmt: skip
    if manifest.compute.mesh is None and values["num_processes"] > 1:
        raise manifest.error("compute.mesh", "a multi-process run needs a mesh over the processes' devices "
                                             "(e.g. compute.mesh: {expert: N, model: 1})")  # fmt: skip
    timeout = section.timeout_s if section is not None else 300.0
    return DistributedSettings(values["coordinator"], values["num_processes"], values["process_id"], timeout)


_initialized: DistributedSettings | None = None


def initialize(settings: DistributedSettings) -> None:
    """Join the other processes (once per process), with gloo collectives on CPU."""
    global _initialized
    if _initialized is not None:
        if _initialized != settings:
            raise DistributedError(f"this process already joined {_initialized}; cannot join {settings} as well")
        return
    import jax

    # Cross-process collectives on CPU go through gloo (JAX's default since 0.5; set for older ones).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = max(int(settings.timeout_s), 1)
    try:
        # both after the watchdog's timeout, so a missing or lost peer is reported by name first
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                                   initialization_timeout=timeout + 30, heartbeat_timeout_seconds=timeout + 30)  # fmt: skip
    except Exception as e:  # jaxlib reports connection failures as its own runtime errors
        raise DistributedError(f"process {settings.process_id} of {settings.num_processes} could not join the "
                               f"coordinator at {settings.coordinator} within {timeout} s: {_first_line(e)}") from None  # fmt: skip
    _initialized = settings


def join(plan) -> DistributedSettings | None:
    """Before any JAX work: join the run's other processes (when it has them) and watch them; then
    check the mesh against the devices now visible. None for a one-process run."""
    global _watchdog
    settings = settings_from(plan.manifest)
    if settings is not None and settings.num_processes > 1:
        if started_from_the_cli() and not supervised():  # see run/supervisor.py: process 0 may die
            supervise(settings.process_id, settings.num_processes, settings.coordinator)
        # Watched from before joining: jaxlib ends a process that waits too long for its peers with a
        # fatal log of its own, so the named error must come first.
        _watchdog = _watchdog or Watchdog(settings, joining=True)
        _filter_gloo_lines()
        try:
            initialize(settings)
        except BaseException:
            _stop_filtering()  # the error goes out as one line; nothing written to stdout is left in the pipe
            raise
        _watchdog.beat("joining the other processes", joined=True)
    check_mesh(plan, settings.num_processes if settings is not None else 1)
    return settings


def check_mesh(plan, processes: int = 1) -> None:
    """``compute.mesh`` fits the devices present, and what the run checks can be checked on it."""
    if plan.mesh is None:
        return
    from kimi_jax.model.mesh import MeshError, mesh_devices

    m = plan.manifest
    if m.storage.speculate:
        raise m.error("compute.mesh", "storage.speculate (true) applies to one device: on a mesh each step deals the "
                                      "experts the router picked to the devices, so there is nothing to read ahead; "
                                      "set storage.speculate: false")  # fmt: skip
    try:
        mesh_devices(plan.mesh)
    except MeshError as e:
        raise plan.manifest.error("compute.mesh", str(e)) from None
    if processes > 1 and plan.shares_passes:
        field = "prompts" if m.prompts is not None else "generate.drafts"
        raise m.error(field, f"shared passes (prompts:, generate.drafts) run in one process, on any mesh of its "
                             f"devices; this run has {processes} processes")  # fmt: skip
    source = getattr(plan, "source", None)
    # Several processes each read a share of rows of every non-expert tensor: the digest file must
    # check a share without the rest, by segments (one process reads each tensor whole).
    if processes > 1 and source is not None and source.digests is not None:
        from kimi_jax.storage.digests import unsegmented

        whole = unsegmented(source.digests, source.index)
        if whole:
            raise plan.manifest.error("compute.mesh", f"the digest file {source.digest_file} checks {len(whole)} "
                                                      f"tensor(s) only whole (first: {whole[0]!r}), but in a run of "
                                                      f"{processes} processes each reads a share of their rows; "
                                                      "write it again with `kimi-jax digest` (it adds a digest per "
                                                      "segment of rows), run in one process, or set "
                                                      "storage.verify_digests: false")  # fmt: skip


_watchdog: Watchdog | None = None
_stdout_filter = None  # kimi_jax.run.gloo_lines.StdoutFilter of a multi-process run


def _filter_gloo_lines() -> None:
    """gloo's '[Gloo] Rank N is connected...' notices stay out of the text on stdout (run/gloo_lines.py)."""
    global _stdout_filter
    if _stdout_filter is None:
        from kimi_jax.run.gloo_lines import StdoutFilter

        _stdout_filter = StdoutFilter()


def _stop_filtering() -> None:
    global _stdout_filter
    if _stdout_filter is not None:
        _stdout_filter.stop()
        _stdout_filter = None


def fault_hook():
    """Testing aid: ``KIMI_JAX_FAULT=RUN:STEP:LAYER[:SIGNAL]`` sends the process SIGNAL (default
    SIGKILL, or e.g. SIGINT) inside that layer of that run (``bare`` or ``instrumented``), as a
    process lost mid-run would be; None when unset."""
    spec = os.environ.get("KIMI_JAX_FAULT")
    if not spec:
        return None
    run, step, layer, *sig = spec.split(":")
    signum = getattr(signal, sig[0]) if sig else signal.SIGKILL

    def maybe_die(name: str, s: int, l: int) -> None:
        if (name, s, l) == (run, int(step), int(layer)):
            os.kill(os.getpid(), signum)

    return maybe_die


def beat(where: str) -> None:
    """Report progress to the watchdog of a multi-process run (nothing otherwise)."""
    if _watchdog is not None:
        _watchdog.beat(where)


def finish() -> None:
    """After a multi-process run: stop watching and leave together (``jax.distributed.shutdown`` waits
    for every process, so process 0 has written the bundle when any process returns)."""
    global _watchdog, _initialized
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if _initialized is not None:
        import jax

        jax.distributed.shutdown()
        _initialized = None
    _stop_filtering()


def is_writer() -> bool:
    """Only process 0 writes: the bundle, the resume files, the report."""
    return process_index() == 0


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _die(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    _stop_filtering()  # what was written to stdout is passed on first
    os._exit(EXIT_PEER_LOST)


@contextlib.contextmanager
def fail_fast(settings: DistributedSettings | None) -> Iterator[None]:
    """In a multi-process run, any error ends this process at once with one line on stderr.

    A failed collective (a peer closed its connections) is reported as :class:`PeerProcessLost`."""
    if settings is None or settings.num_processes == 1:
        yield
        return
    try:
        yield
    except KimiJaxError as e:
        _die(f"{type(e).__name__}: {e}")
    except Exception as e:
        text = str(e)
        if any(s in text for s in ("Gloo", "gloo", "Connection closed", "Connection reset", "coordination service")):
            _die(f"PeerProcessLost: process {settings.process_id} of {settings.num_processes}: a collective with the "
                 f"other processes failed ({_first_line(e)}); another process has died")  # fmt: skip
        _die(f"{type(e).__name__} in process {settings.process_id} of {settings.num_processes}: {_first_line(e)}")


class SharedCheckpoints:
    """The resume files of a run (:class:`~kimi_jax.run.resume.RunCheckpoints`) as every process sees
    them: process 0 keeps the files; on resume it sends the others the completed steps' tokens
    and, with the KV cache, the caches after the last of them (the others never write)."""

    def __init__(self, files, plan):
        self.files, self.plan = files, plan

    @property
    def root(self):
        """Where process 0 keeps the completed steps (None in the other processes)."""
        return self.files.root if self.files is not None else None

    def load(self, run: str) -> tuple[list, list | None]:
        import numpy as np
        from jax.experimental.multihost_utils import broadcast_one_to_all

        steps, caches = self.files.load(run) if self.files is not None else ([], None)
        count = int(broadcast_one_to_all(np.int32(len(steps))))
        if count == 0:
            return steps, caches
        mine = np.array([s.token for s in steps], np.int32) if steps else np.zeros(count, np.int32)
        tokens = [int(t) for t in np.asarray(broadcast_one_to_all(mine))]
        m = self.plan.manifest
        if m.generate.kv_cache:
            from kimi_jax.model.layers import LatentCache
            from kimi_jax.model.weights import DTYPES

            capacity = len(self.plan.prompt) + m.generate.max_new_tokens
            template = caches or LatentCache.for_run(self.plan.index.config, capacity, DTYPES[m.compute.dtype])
            shared = broadcast_one_to_all(template)
            caches = [LatentCache(*(np.asarray(a) for a in (c.c_kv, c.k_pe, c.length))) for c in shared]
        if self.files is None:  # the others need only the tokens, to continue the context
            from kimi_jax.records import StepRecord

            prompt = list(self.plan.prompt)
            steps = [StepRecord(i, prompt + tokens[:i], t, 0.0, np.zeros(0, np.float32), np.zeros(0, np.float32), [],
                                0, {}, 0.0) for i, t in enumerate(tokens)]  # fmt: skip
        return steps, caches

    def save(self, run: str, step) -> None:
        if self.files is not None:
            self.files.save(run, step)

    def discard(self) -> None:
        if self.files is not None:
            self.files.discard()


class Watchdog:
    """Ends the process with :class:`PeerProcessLost` when no progress is reported for ``timeout_s``.

    ``beat(where)`` reports progress; the watchdog is a daemon thread, so a finished run just
    returns (call :meth:`stop`)."""

    def __init__(self, settings: DistributedSettings, poll_s: float = 0.5, joining: bool = False):
        self.settings = settings
        self.where, self.joining = "starting", joining
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="kimi-jax-watchdog", daemon=True)
        self._thread.start()

    def beat(self, where: str, joined: bool = True) -> None:
        self.where, self._last = where, time.monotonic()
        self.joining = self.joining and not joined

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, poll_s: float) -> None:
        s = self.settings
        while not self._stop.wait(poll_s):
            idle = time.monotonic() - self._last
            if idle > s.timeout_s and self.joining:
                _die(f"DistributedError: process {s.process_id} of {s.num_processes} could not join the others at "
                     f"{s.coordinator} within {s.timeout_s:g} s (distributed.timeout_s): is every process started, "
                     "with the same coordinator, and can this host reach it?")  # fmt: skip
            if idle > s.timeout_s:
                _die(f"PeerProcessLost: process {s.process_id} of {s.num_processes} made no progress for "
                     f"{idle:.0f} s (distributed.timeout_s {s.timeout_s:g}) after {self.where}; another process has "
                     "died or hangs")  # fmt: skip


__all__ = [
    "ENVIRONMENT", "EXIT_PEER_LOST", "DistributedError", "PeerProcessLost", "DistributedSettings",
    "settings_from", "initialize", "join", "check_mesh", "beat", "finish", "is_writer", "process_index",
    "process_count", "fail_fast", "fault_hook", "SharedCheckpoints", "Watchdog",
]
