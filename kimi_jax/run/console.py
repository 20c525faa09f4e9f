"""What a run shows while it proceeds: the generated text on stdout, progress on stderr.

* :class:`TextStream` writes the text token by token: special tokens left out, a UTF-8 character
  split across tokens written once complete, and text that could be the start of a stop string
  held back until it is known not to be (the stop string itself is never written). Without a
  tokenizer it writes the token ids.
* :class:`Progress` draws a per-layer bar when stderr is a terminal and otherwise (CI logs, pipes)
  writes one line per step. The run whose text streams to a terminal draws no bar: its redraws
  would overwrite the text on the same screen.
* :func:`describe_run` says what is about to run; :func:`report` sums up the steps at the end.
"""

from __future__ import annotations

import codecs
import io
import sys
import time
from pathlib import Path
from typing import TextIO

from kimi_jax.text.tokenizer import Tokenizer, display_text


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


class Progress:
    """Progress of one run (bare or instrumented) of ``steps`` x ``layers`` layer passes."""

    def __init__(self, name: str, steps: int, layers: int, enabled: bool, tokenizer: Tokenizer | None = None,
                 stream: TextIO | None = None, draw_bar: bool = True):  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        terminal = self.stream.isatty()
        self.name, self.layers, self.tokenizer = name, layers, tokenizer
        self.enabled = enabled and (draw_bar or not terminal)
        self.started, self.bytes_done = time.perf_counter(), 0
        self.bar = None
        if self.enabled and terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=steps * layers, unit="layer", dynamic_ncols=True, desc=name, file=self.stream)

    def skip_steps(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count * self.layers)

    def layer(self, step: int, layer: int, step_bytes: int) -> None:
        if self.bar is None:
            return
        total = self.bytes_done + step_bytes
        rate = total / max(time.perf_counter() - self.started, 1e-9) / 2**20
        self.bar.set_description(f"{self.name} step {step} layer {layer}")
        self.bar.set_postfix_str(f"{total / 2**20:,.1f} MiB read, {rate:,.0f} MiB/s")
        self.bar.update(1)

    def step(self, record) -> None:
        self.bytes_done += record.bytes_read
        if not self.enabled or self.bar is not None:
            return
        shown = ""
        if self.tokenizer is not None and (data := self.tokenizer.token_bytes(record.token)) is not None:
            shown = " " + repr(display_text(data))  # repr: control characters escaped, never sent to the log raw
        print(f"{self.name} step {record.index}: token {record.token}{shown}, {record.bytes_read:,} bytes read, "
              f"{record.wall_s:.2f} s", file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_run(plan, page_cache: dict) -> list[str]:
    """What is about to run, from where, and how its bytes are checked: lines for the console."""
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
    return lines


def report(steps: list, proof: dict | None, ledger_path: Path, echo=to_stderr,
           stopped: dict | None = None) -> None:  # fmt: skip
    """Per step: token, logit, bytes used and where they came from, the expert cache's hit rate, wall time."""
    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes used':>14} {'from storage':>14} {'from memory':>14} "
         f"{'expert hits':>11} {'wall s':>8}")  # fmt: skip
    for s in steps:
        used = sum(layer.io.experts_used for layer in s.layers)
        hits = f"{sum(layer.io.experts_from_memory for layer in s.layers) / used:.0%}" if used else "-"
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} "
             f"{s.io.from_storage + s.io.from_speculation:>14,} {s.io.from_memory:>14,} {hits:>11} {s.wall_s:>8.3f}")  # fmt: skip
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    if stopped is not None:
        echo(f"stopped: {stopped['reason']}" + "".join(f", {k} {v!r}" for k, v in stopped.items() if k != "reason"))
    echo(("non-perturbation: bare and instrumented runs identical; " if proof else "") + f"ledger: {ledger_path}")
