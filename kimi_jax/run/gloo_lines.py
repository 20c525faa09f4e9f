"""Keep gloo's connection notices out of a multi-process run's output.

On CPU, cross-process collectives go through gloo inside jaxlib, which writes
``[Gloo] Rank N is connected to M peer ranks. Expected number of connected peer ranks is : M``
to the process's standard output (C++ ``std::cout``) each time it connects a group of processes:
in the middle of the generated text, and in ``--json``'s one object. Nothing sets it off. So for a
multi-process run, file descriptor 1 is pointed at a pipe and a thread copies what comes through
to the real standard output at once, leaving out whole lines that begin with ``[Gloo] ``. A line
start that could still become one (``[`` through ``[Gloo]``) waits for its next bytes.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["GlooLineFilter", "StdoutFilter"]

PREFIX = b"[Gloo] "


class GlooLineFilter:
    """The byte filter: ``feed`` takes what was written, returns what to pass on; ``close`` the rest."""

    def __init__(self) -> None:
        self.held = b""  # the start of a line that could still be a gloo line
        self.dropping = False  # inside a gloo line, up to its newline
        self.line_start = True

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        data = self.held + data
        self.held = b""
        while data:
            if self.dropping:
                end = data.find(b"\n")
                if end < 0:
                    return bytes(out)
                data, self.dropping, self.line_start = data[end + 1 :], False, True
                continue
            if self.line_start:
                head = data[: len(PREFIX)]
                if head == PREFIX:
                    self.dropping = True
                    continue
                if PREFIX.startswith(head):  # too short to tell yet
                    self.held = data
                    return bytes(out)
            end = data.find(b"\n")
            if end < 0:
                out += data
                self.line_start = False
                return bytes(out)
            out += data[: end + 1]
            data, self.line_start = data[end + 1 :], True
        return bytes(out)

    def close(self) -> bytes:
        """What was held back, now that nothing more will come (an unfinished gloo line is dropped)."""
        rest, self.held = (b"" if self.dropping else self.held), b""
        return rest


class StdoutFilter:
    """Route this process's file descriptor 1 through :class:`GlooLineFilter` until :meth:`stop`."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.real = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._copy, name="kimi-jax-stdout", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        lines = GlooLineFilter()
        while chunk := os.read(self.read, 1 << 16):
            self._write(lines.feed(chunk))
        self._write(lines.close())
        os.close(self.read)

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.real, data) :]

    def stop(self, timeout_s: float = 5.0) -> None:
        """Standard output back to where it was, once everything written so far has been passed on."""
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real, 1)  # the pipe's last write end closes: the thread reads to its end
        self.thread.join(timeout_s)
        os.close(self.real)
