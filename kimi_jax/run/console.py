"""What a run shows while it proceeds: the generated text on stdout, progress on stderr.

* :class:`TextStream` writes the text token by token: special tokens left out, a UTF-8 character
  split across tokens written once complete, and text that could be the start of a stop string
  held back until it is known not to be (the stop string itself is never written). Without a
  tokenizer it writes the token ids.
* :class:`Progress` draws a per-layer bar when stderr is a terminal and otherwise (CI logs, pipes)
  writes one line per step (:mod:`kimi_jax.progress`, the policy of every command). The run whose
  text streams to a terminal draws no bar: its redraws would overwrite the text on the same screen.
  A step that compiles says so as it happens (:class:`CompileNote`), and its line gives the seconds.
* :func:`describe_run` says what is about to run; :func:`report` sums up the steps at the end.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import sys
import time
from pathlib import Path
from typing import TextIO

from kimi_jax.progress import is_terminal, progress_bar
from kimi_jax.run import compile_clock
from kimi_jax.settings import PROVE_ALL, PROVE_FIRST
from kimi_jax.text.tokenizer import Tokenizer, display_text

# A step is said to compile once it has spent this long making programs (tracing and lowering alone,
# with every program in the persistent cache, take a few hundredths of a second per layer).
COMPILE_NOTE_S = 0.5


def to_stderr(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop_strings: tuple[str, ...] = (), out: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.out = out if out is not None else io.StringIO()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded but not yet written
        self.written: list[str] = []
        self.stopped = False  # a stop string was found: nothing more is written

    @property
    def text(self) -> str:
        return "".join(self.written)

    def feed(self, token: int) -> None:
        if self.stopped:
            return
        if self.tokenizer is None:
            self._write(f"{token} ")
            return
        if self.tokenizer.is_special(token):
            return
        self.pending += self.decoder.decode(self.tokenizer.token_bytes(token) or b"")
        self._release(final=False)

    def close(self) -> None:
        if self.tokenizer is not None and not self.stopped:
            self.pending += self.decoder.decode(b"", final=True)
            self._release(final=True)
        self._write("\n")

    def _release(self, final: bool) -> None:
        found = [at for at in (self.pending.find(s) for s in self.stop_strings) if at >= 0]
        if found:
            self._write(self.pending[: min(found)])
            self.pending, self.stopped = "", True
            return
        hold = 0 if final else self._possible_stop_start()
        self._write(self.pending[: len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold :]

    def _possible_stop_start(self) -> int:
        """Length of the longest end of ``pending`` that begins some stop string."""
        for n in range(min(len(self.pending), max((len(s) for s in self.stop_strings), default=0)), 0, -1):
            if any(s.startswith(self.pending[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _write(self, text: str) -> None:
        if text:
            self.written.append(text)
            self.out.write(text)
            self.out.flush()


def streamed_text(tokenizer: Tokenizer | None, stop_strings: tuple[str, ...], tokens: list[int]) -> str:
    """The text :class:`TextStream` writes for ``tokens``, without the final newline."""
    stream = TextStream(tokenizer, stop_strings)
    for token in tokens:
        stream.feed(token)
    stream.close()
    return stream.text[:-1]


@dataclasses.dataclass
class CompileNote:
    """Why a step is compiling, said once per run for step 0 and once for a later step."""

    kv_cache: bool
    cache_dir: Path | None = None

    def line(self, name: str, step: int) -> str:
        later = f"; later runs load them from the compilation cache in {self.cache_dir}" if self.cache_dir else ""
        if step == 0:
            return f"{name} step 0: compiling the layer programs{later}"
        if not self.kv_cache:
            return (f"{name} step {step}: compiling again: without the KV cache (generate.kv_cache: false) every step "
                    f"recomputes a sequence one token longer, and each length is a new program{later}")  # fmt: skip
        return f"{name} step {step}: compiling new programs{later}"


class Progress:
    """Progress of one run (bare or instrumented) of ``steps`` x ``layers`` layer passes."""

    def __init__(self, name: str, steps: int, layers: int, enabled: bool, tokenizer: Tokenizer | None = None,
                 stream: TextIO | None = None, draw_bar: bool = True,
                 compile_note: CompileNote | None = None):  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        terminal = is_terminal(self.stream)
        self.name, self.layers, self.tokenizer = name, layers, tokenizer
        self.enabled = enabled and (draw_bar or not terminal)
        self.started, self.bytes_done = time.perf_counter(), 0
        self.compile_note = compile_note
        self.step_started = compile_clock.now()
        self.noted: set[bool] = set()  # which notes were given: step 0's (False), a later step's (True)
        self.bar = None
        if self.enabled and terminal:
            self.bar = progress_bar(steps * layers, name, "layer", stream=self.stream)

    def skip_steps(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count * self.layers)

    def layer(self, step: int, layer: int, step_bytes: int) -> None:
        compiling = self._note_compiling(step)
        if self.bar is None:
            return
        total = self.bytes_done + step_bytes
        rate = total / max(time.perf_counter() - self.started, 1e-9) / 2**20
        self.bar.set_description(f"{self.name} step {step} layer {layer}")
        self.bar.set_postfix_str(f"{total / 2**20:,.1f} MiB read, {rate:,.0f} MiB/s" + (", compiling" if compiling else ""))
        self.bar.update(1)

    def _note_compiling(self, step: int) -> bool:
        """Whether this step has been compiling (programs the persistent cache did not hold); the first
        time in a run (for step 0, for a later step), why."""
        if self.compile_note is None:
            return False
        now = compile_clock.now()
        compiling = (compile_clock.compilations(self.step_started, now) > 0
                     and compile_clock.compile_seconds(self.step_started, now) >= COMPILE_NOTE_S)  # fmt: skip
        if compiling and self.enabled and (step > 0) not in self.noted:
            self.noted.add(step > 0)
            self._line(self.compile_note.line(self.name, step))
        return compiling

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def step(self, record) -> None:
        self._note_compiling(record.index)  # a step of one layer, or one program for all of them
        compiled = compile_clock.compilations(self.step_started, compile_clock.now()) > 0
        self.step_started = compile_clock.now()
        self.bytes_done += record.bytes_read
        if not self.enabled or self.bar is not None:
            return
        shown = ""
        if self.tokenizer is not None:
            data = self.tokenizer.token_bytes(record.token)
            # repr: control characters escaped, never sent to the log raw
            shown = " (not in the tokenizer)" if data is None else " " + repr(display_text(data))
        making = "compiling" if compiled else "loading compiled programs"
        compiling = f" ({record.compile_s:.2f} s {making})" if record.compile_s >= 0.005 else ""
        print(f"{self.name} step {record.index}: token {record.token}{shown}, {record.bytes_read:,} bytes read, "
              f"{record.wall_s:.2f} s{compiling}", file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_run(plan, page_cache: dict, prove: str | None = None) -> list[str]:
    """What is about to run, from where, how its bytes are checked and what the proof covers: lines for
    the console."""
    m, cfg = plan.manifest, plan.index.config
    lines = [f"{plan.index.layout} checkpoint {plan.index.location}"]
    if plan.source is not None and plan.source.digest_file:
        checked = plan.source.digests is not None
        state = (f"every tensor read is checked (content root {plan.source.digests.root})" if checked
                 else "not checked (storage.verify_digests is false)")  # fmt: skip
        lines.append(f"digest file {plan.source.digest_file}: {state}")
    sampling = plan.decoding.sampling
    choice = f"sampling {sampling.as_dict()}" if sampling else "greedy"
    lines.append(f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; "
                 f"prompt {list(plan.prompt)}; up to {m.generate.max_new_tokens} new tokens, {choice}, "
                 f"kv_cache {m.generate.kv_cache}, {m.compute.dtype}, dequant {m.compute.dequant}; page cache "
                 f"{page_cache['page_cache_resident_bytes']:,} of {page_cache['shard_bytes']:,} shard bytes "
                 "resident")  # fmt: skip
    kernels = plan.kernels
    if kernels is None:
        lines.append(f"matmul {m.compute.matmul}")
    elif kernels["kernel_set"]:
        lines.append(f"matmul kernels: {kernels['kernel_set']} on {kernels['isa']}")
    else:
        lines.append(f"matmul kernels unavailable ({kernels['unavailable']}): XLA's stored products run instead")
    lines.append({PROVE_FIRST: "non-perturbation proof: step 0 (the anchor step) runs bare first, then every step "
                               "instrumented (--prove all: every step bare as well)",
                  PROVE_ALL: "non-perturbation proof: every step runs bare, then instrumented (a second pass)",
                  None: "no non-perturbation proof (--no-prove): every step runs instrumented only"}[prove])  # fmt: skip
    return lines


def report(steps: list, proof: dict | None, ledger_path: Path, echo=to_stderr, stopped: dict | None = None,
           totals: dict | None = None, tokenizer: Tokenizer | None = None) -> None:  # fmt: skip
    """Per step: token, logit, bytes used and where they came from, the expert cache's hit rate, wall
    time and the part of it spent compiling; the run's wall time; tokens the text could not show."""
    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes used':>14} {'from storage':>14} {'from memory':>14} "
         f"{'expert hits':>11} {'wall s':>8} {'compile s':>9}")  # fmt: skip
    for s in steps:
        used = sum(layer.io.experts_used for layer in s.layers)
        hits = f"{sum(layer.io.experts_from_memory for layer in s.layers) / used:.0%}" if used else "-"
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} "
             f"{s.io.from_storage + s.io.from_speculation:>14,} {s.io.from_memory:>14,} {hits:>11} {s.wall_s:>8.3f} "
             f"{s.compile_s:>9.3f}")  # fmt: skip
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    for line in text_notes(tokenizer, [s.token for s in steps]):
        echo(line)
    if stopped is not None:
        echo(f"stopped: {stopped['reason']}" + "".join(f", {k} {v!r}" for k, v in stopped.items() if k != "reason"))
    if totals is not None and "run_wall_s" in totals:
        proof_s = f", {totals['proof_wall_s']:.2f} s of them the proof's bare pass" if proof else ""
        echo(f"wall: {totals['run_wall_s']:.2f} s for the whole run{proof_s}; the steps above {totals['wall_s']:.2f} s, "
             f"{totals['compile_s']:.2f} s of them compiling")  # fmt: skip
    if totals and (totals.get("proof_bytes_network") or totals.get("bytes_network")):
        echo(f"network: {totals['bytes_network']:,} bytes for the steps above, "
             f"{totals.get('proof_bytes_network', 0):,} for the proof's bare pass (it ran first; the range cache "
             "served the steps what it fetched)")  # fmt: skip
    if proof:
        covered = "every step" if proof.get("scope", PROVE_ALL) == PROVE_ALL else "step 0"
        echo(f"non-perturbation: bare and instrumented runs identical on {covered}; ledger: {ledger_path}")
    else:
        echo(f"ledger: {ledger_path}")


def text_notes(tokenizer: Tokenizer | None, tokens: list[int]) -> list[str]:
    """What the streamed text could not show: ids the tokenizer lacks (left out of the text), and bytes
    that are not UTF-8 (each shown as U+FFFD, the replacement character)."""
    if tokenizer is None:
        return []
    lacking = sorted({t for t in tokens if tokenizer.token_bytes(t) is None})
    data = b"".join(tokenizer.token_bytes(t) or b"" for t in tokens if not tokenizer.is_special(t))
    replaced = data.decode("utf-8", errors="replace").count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    notes = []
    if lacking:
        notes.append(f"text: token id(s) {', '.join(map(str, lacking))} are not in the tokenizer (the model's vocabulary "
                     "is larger than the tokenizer's) and are left out of the text")  # fmt: skip
    if replaced:
        notes.append(f"text: {replaced} byte sequence(s) of the generated tokens are not valid UTF-8 and are shown as "
                     "U+FFFD; the ledger's token_bytes holds every token's exact bytes")  # fmt: skip
    return notes
