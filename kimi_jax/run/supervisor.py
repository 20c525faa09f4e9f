"""A multi-process run's process 0 can die; its peers must then end with ``PeerProcessLost``, exit 3.

Why a supervising parent: process 0 hosts jax.distributed's coordination service. When it dies,
every other process's coordination client polls the error and jaxlib ends that process itself,
with a fatal log and SIGABRT, from one of its own threads, before any Python code can run.
jaxlib's client takes a handler for those errors (``missed_heartbeat_callback``), but calling a
Python handler with the error fails inside jaxlib (``std::bad_cast``, another abort), and
``jax.distributed.initialize`` offers no other switch. So the process the user started
supervises: it runs the same command in a child, passes its stdout through untouched and its
stderr line by line, and when the child is ended by jaxlib's abort after a coordination-service
error, it prints the one documented line and exits with code 3. jaxlib's log lines of that abort
are held back and saved to a file the line names; any other outcome passes them on and ends
the same way the child did (its exit code, or the signal that ended it).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import NoReturn

SUPERVISED = "KIMI_JAX_SUPERVISED"
EXIT_PEER_LOST = 3
# jaxlib's (absl's) error and fatal log lines, e.g. "E1206 17:58:29.106417   31201 file.cc:289] ..."
_ABSL_ERROR = re.compile(r"^[EF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
HOLD_S = 2.0  # held lines are passed on if nothing ends the child this long after the last one


def supervised() -> bool:
    return os.environ.get(SUPERVISED) == "1"


def started_from_the_cli() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name == "kimi_jax.cli") or os.path.basename(sys.argv[0]) == "kimi-jax"


def supervise(process_id: int, num_processes: int, coordinator: str) -> NoReturn:
    """Run this command again in a child and end as described in the module doc."""
    child = subprocess.Popen([sys.executable, "-m", "kimi_jax.cli", *sys.argv[1:]], env={**os.environ, SUPERVISED: "1"},
                             stderr=subprocess.PIPE)  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child too; it reports and exits 130
    for forwarded in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(forwarded, lambda signum, _: child.send_signal(signum))
    held = _relay(child)
    code = child.wait()
    if code == -signal.SIGABRT and any("coordination service" in line for line in held):
        _write(f"error: PeerProcessLost: process {process_id} of {num_processes}: the coordination service of process "
               f"0 ({coordinator}) is gone; another process has died (jaxlib's log of it: {_save(held)})\n")  # fmt: skip
        os._exit(EXIT_PEER_LOST)
    for line in held:
        _write(line)
    if code < 0:  # end as the child ended: by the same signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def _relay(child: subprocess.Popen) -> list[str]:
    """Pass the child's stderr on line by line until it closes, holding back jaxlib's error lines
    (and what follows them) while the child may be aborting; returns what is still held."""
    fd = child.stderr.fileno()
    pending, held, last = b"", [], 0.0
    while True:
        ready, _, _ = select.select([fd], [], [], HOLD_S if held else None)
        if not ready:
            if held and time.monotonic() - last >= HOLD_S and child.poll() is None:
                for line in held:  # the child lives on: they were only errors it survived
                    _write(line)
                held = []
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if pending and held:
                held.append(pending.decode("utf-8", "replace"))
            elif pending:
                _write(pending.decode("utf-8", "replace"))
            return held
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace") + "\n"
            if held or _ABSL_ERROR.match(line):
                held.append(line)
                last = time.monotonic()
            else:
                _write(line)


def _write(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _save(lines: list[str]) -> str:
    try:
        fd, path = tempfile.mkstemp(prefix="kimi-jax-peer-lost-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        return path
    except OSError as e:
        return f"not saved ({e.strerror})"
