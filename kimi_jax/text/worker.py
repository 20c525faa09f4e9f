"""Where a checkpoint's code-like files run: a child process with a memory and a time limit.

A chat template is a program, and a ``tokenizer.json`` drives the ``tokenizers`` library, whose
Rust code aborts the whole process when an allocation fails (a normalizer that grows its input)
and panics on a runaway regex. Neither may take kimi-jax down or make it grow without bound, in
``run`` or in ``verify``. So both run here, in a child of the kimi-jax process:

* its address space is limited to what it holds after start-up plus :data:`WORKER_MEMORY`
  (``RLIMIT_AS``): past that an allocation fails (Python: MemoryError; Rust: an abort);
* every request has a wall-time limit (:data:`RENDER_SECONDS`, :data:`LOAD_SECONDS`,
  :data:`CALL_SECONDS`); past it the child is killed;
* a reply is at most :data:`MAX_REPLY_BYTES`;
* whatever happens to the child (an error, a panic, an abort, a kill) comes back as one
  :class:`WorkerFailed` with what went wrong, which the caller names as a TokenizerError.

The child holds one parsed ``tokenizer.json`` (for :class:`~kimi_jax.text.tokenizer.JsonTokenizer`)
and renders templates (:mod:`kimi_jax.text.sandbox`); requests and replies are JSON lines on its
stdin and stdout. It exits when its stdin closes or its parent is gone. No JAX here.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

WORKER_MEMORY = 1 << 30  # address space the child may add to what it holds after start-up
RENDER_SECONDS = 10.0  # one template rendering
LOAD_SECONDS = 30.0  # parsing one tokenizer.json (the real ones take about a second)
CALL_SECONDS = 10.0  # one encode or token lookup
MAX_REPLY_BYTES = 64 << 20
TOKENIZER_JSON_LIMIT = 64 << 20  # the largest tokenizer.json read (real ones: 2-35 MB)


class WorkerFailed(Exception):
    """A request to the worker failed; ``kind`` is one of limit, template, memory, recursion,
    error, timeout, died."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _package_parent() -> str:
    return str(Path(__file__).resolve().parents[2])


def _stop(proc: subprocess.Popen, stderr) -> None:
    try:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    except (OSError, ValueError):
        pass
    for f in (proc.stdin, proc.stdout, stderr):
        try:
            f.close()
        except (OSError, ValueError):
            pass


class Worker:
    """One child process; ``setup`` requests are sent again whenever a new child is started (after
    a failure killed the previous one)."""

    def __init__(self, setup: list[tuple[str, dict, float]] | None = None):
        self.setup = list(setup or [])
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._finalizer = None

    def _start(self) -> None:
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "RUST_BACKTRACE": "0",
               "PYTHONPATH": os.pathsep.join(p for p in (_package_parent(), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
        stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-m", "kimi_jax.text.worker", str(WORKER_MEMORY)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
                                      close_fds=True)  # fmt: skip
        self._stderr = stderr
        self._buffer = bytearray()
        self._finalizer = weakref.finalize(self, _stop, self._proc, stderr)
        for op, args, timeout_s in self.setup:
            self._request(op, args, timeout_s)

    def call(self, op: str, args: dict, timeout_s: float = CALL_SECONDS) -> Any:
        with self._lock:
            if self._proc is None:
                self._start()
            return self._request(op, args, timeout_s)

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc, self._finalizer = None, None

    def _request(self, op: str, args: dict, timeout_s: float) -> Any:
        proc = self._proc
        try:
            proc.stdin.write(json.dumps({"op": op, **args}, ensure_ascii=True).encode() + b"\n")
            proc.stdin.flush()
            line = self._read_line(time.monotonic() + timeout_s, timeout_s)
        except (BrokenPipeError, ConnectionResetError):
            line = None
        except WorkerFailed:
            self._discard()
            raise
        if line is None:
            raise self._died()
        reply = json.loads(line)
        if "error" in reply:
            if reply.get("fatal"):
                self._discard()
            raise WorkerFailed(reply["kind"], reply["error"])
        return reply["ok"]

    def _read_line(self, deadline: float, timeout_s: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed("timeout", f"did not finish within {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise WorkerFailed("limit", f"its answer is longer than {MAX_REPLY_BYTES:,} bytes")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    def _died(self) -> WorkerFailed:
        proc = self._proc
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - 4096))
        tail = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines()
                if line.strip() and not line.startswith("note:")]  # fmt: skip
        self._discard()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        said = f": {tail[-1][:200]}" if tail else ""
        return WorkerFailed("died", f"the process doing it ended with {how}{said}")


# -- the child ------------------------------------------------------------------------------------


def gpt2_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins: bytes that print as themselves keep their character,
    the others take characters from U+0100 upwards, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


def _watch_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="kimi-jax-worker-parent").start()


def _limit_memory(extra: int) -> None:
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


class _Child:
    def __init__(self) -> None:
        self.hf = None
        self.added: dict[int, tuple[str, bool]] = {}
        self.alphabet: dict[str, int] = {}

    def render(self, source: str, variables: dict) -> str:
        from kimi_jax.text.sandbox import render

        return render(source, variables)

    def load(self, path: str, digest: str) -> dict:
        """Parse ``path`` (read through its size limit; its digest must be the one the parent
        computed, so the tokenizer is the file it recorded) with the tokenizers package."""
        import blake3
        from tokenizers import Tokenizer

        from kimi_jax.errors import TokenizerError
        from kimi_jax.fileio import parse_json, read_regular

        data = read_regular(path, TOKENIZER_JSON_LIMIT, "tokenizer file", TokenizerError)
        if blake3.blake3(data).hexdigest() != digest:
            raise TokenizerError(f"{path}: changed while it was being read")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        del data
        self.hf = Tokenizer.from_str(text)
        del text
        self.added = {int(i): (t.content, bool(t.special)) for i, t in self.hf.get_added_tokens_decoder().items()}
        decoder = parse_json(self.hf.decoder.__getstate__(), f"{path}: decoder", TokenizerError) \
            if self.hf.decoder is not None else {}  # fmt: skip
        parts = decoder.get("decoders") if isinstance(decoder, dict) else None
        kinds = {d.get("type") for d in parts or [] if isinstance(d, dict)} | {decoder.get("type")}
        byte_level = "ByteLevel" in kinds
        self.alphabet = gpt2_byte_alphabet() if byte_level else {}
        return {"added": [[i, c, s] for i, (c, s) in sorted(self.added.items())], "byte_level": byte_level}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def token_bytes(self, ids: list[int]) -> list[str | None]:
        out: list[str | None] = []
        for token in ids:
            if token in self.added:
                out.append(self.added[token][0].encode("utf-8", "surrogatepass").hex())
                continue
            piece = self.hf.id_to_token(token) if 0 <= token < 2**32 else None
            if piece is None:
                out.append(None)
            elif self.alphabet and all(c in self.alphabet for c in piece):
                out.append(bytes(self.alphabet[c] for c in piece).hex())
            else:
                out.append(self.hf.decode([token], skip_special_tokens=False).encode("utf-8", "surrogatepass").hex())
        return out

    def token_to_id(self, name: str) -> int | None:
        return self.hf.token_to_id(name)


def _answer(child: _Child, request: dict) -> dict:
    from kimi_jax.errors import KimiJaxError
    from kimi_jax.text.sandbox import TemplateLimit, clip

    op = request.pop("op", None)
    try:
        if op not in ("render", "load", "encode", "token_bytes", "token_to_id"):
            raise ValueError(f"unknown request {op!r}")
        return {"ok": getattr(child, op)(**request)}
    except TemplateLimit as e:
        return {"error": clip(str(e), 400), "kind": "limit"}
    except MemoryError:
        return {"error": f"needs more than the {WORKER_MEMORY >> 20:,} MiB of memory it may use", "kind": "memory",
                "fatal": True}  # fmt: skip
    except RecursionError:
        return {"error": "recursion too deep", "kind": "recursion"}
    except KimiJaxError as e:
        return {"error": clip(str(e), 400), "kind": "input"}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - jinja2's errors, Python's, and the tokenizers panics (BaseException)
        import jinja2

        kind = "template" if isinstance(e, jinja2.TemplateError) else "error"
        return {"error": f"{type(e).__name__}: {clip(str(e), 300)}", "kind": kind}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes our stdin
    _watch_parent()
    import jinja2.sandbox  # noqa: F401 - loaded before the limit, like tokenizers below

    try:
        import tokenizers  # noqa: F401
    except ImportError:
        pass
    global WORKER_MEMORY
    WORKER_MEMORY = int(sys.argv[1])  # the parent's figure, named in our messages
    _limit_memory(WORKER_MEMORY)
    child = _Child()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            reply = _answer(child, request)
            text = json.dumps(reply, ensure_ascii=True)
        except MemoryError:
            text = json.dumps({"error": "ran out of memory answering", "kind": "memory", "fatal": True})
        sys.stdout.buffer.write(text.encode() + b"\n")
        sys.stdout.buffer.flush()
        if '"fatal": true' in text:
            return


if __name__ == "__main__":
    main()
