"""What commands show while they work: one progress policy for every command (plain lines where
stderr is not a terminal), the compile notes of a run, and what the streamed text cannot show."""

from __future__ import annotations

import io
import re

import jax
import jax.numpy as jnp
import numpy as np
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.progress import LineProgress, progress_bar
from kimi_jax.records import StepRecord
from kimi_jax.run import compile_clock, console
from kimi_jax.text.tokenizer import load_tokenizer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    from tqdm import tqdm

    bar = progress_bar(100, "work", "item", stream=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    bar = progress_bar(100, "work", "item", stream=log)
    assert isinstance(bar, LineProgress)
    for i in range(100):
        bar.set_description(f"work layer {i // 25}")
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10  # a line per tenth, the last when done
    assert lines[0].startswith("work layer 0: at 10 of 100 item (10%), ")
    assert lines[-1].startswith("work layer 3: done 100 of 100 item (100%), ")
    quiet = io.StringIO()
    bar = progress_bar(100, "work", "item", enabled=False, stream=quiet)
    bar.update(100)
    bar.close()
    assert quiet.getvalue() == "" and bar.n == 100


def test_digest_progress_in_a_log_is_plain_lines(tiny_checkpoints, tmp_path):
    import shutil

    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    res = CliRunner().invoke(main, ["digest", str(ckpt), "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "\r" not in res.stderr
    lines = res.stderr.splitlines()
    assert 2 <= len(lines) <= 11 and re.match(r"digest: done [\d.]+ MiB of [\d.]+ MiB \(100%\)", lines[-1]), lines


def _step(index: int, wall_s: float = 1.0, compile_s: float = 0.0) -> StepRecord:
    return StepRecord(index, [1], 5, 1.0, np.zeros(4, np.float32), np.zeros(2, np.float32), [], 10, {}, wall_s,
                      compile_s=compile_s)  # fmt: skip


def test_a_step_that_compiles_says_so_and_why(monkeypatch, tmp_path):
    monkeypatch.setattr(console, "COMPILE_NOTE_S", 0.0)  # a tiny program compiles in milliseconds
    enable_compilation_cache()  # as a run does: its misses are the XLA compilations
    compile_clock.start()
    log = io.StringIO()
    progress = console.Progress("instrumented", 3, 2, True, stream=log,
                                compile_note=console.CompileNote(kv_cache=False, cache_dir=tmp_path))  # fmt: skip
    started = compile_clock.now()
    size = 3 + int(started * 1000) % 1000  # a shape no cache has seen

    def new_program():
        jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(size)).block_until_ready()

    new_program()
    assert compile_clock.compile_seconds(started, compile_clock.now()) > 0
    assert compile_clock.compilations(started, compile_clock.now()) >= 1
    progress.layer(0, 0, 100)
    progress.step(_step(0, compile_s=0.25))
    size += 1
    new_program()
    progress.layer(1, 0, 100)
    size += 1
    new_program()
    progress.layer(1, 1, 100)  # the note is given once
    progress.step(_step(1))
    lines = log.getvalue().splitlines()
    assert lines == [
        f"instrumented step 0: compiling the layer programs; later runs load them from the compilation cache in "
        f"{tmp_path}",
        "instrumented step 0: token 5, 10 bytes read, 1.00 s (0.25 s compiling)",
        "instrumented step 1: compiling again: without the KV cache (generate.kv_cache: false) every step recomputes "
        f"a sequence one token longer, and each length is a new program; later runs load them from the compilation "
        f"cache in {tmp_path}",
        "instrumented step 1: token 5, 10 bytes read, 1.00 s",
    ]
    # a program loaded from the persistent cache is not compiled: no note, and the step line says so
    jax.clear_caches()  # this process forgets the programs; the persistent cache still holds them
    log = io.StringIO()
    progress = console.Progress("bare", 1, 1, True, stream=log, compile_note=console.CompileNote(False, tmp_path))
    new_program()
    progress.layer(1, 0, 1)
    progress.step(_step(1, compile_s=0.125))
    assert log.getvalue() == "bare step 1: token 5, 10 bytes read, 1.00 s (0.12 s loading compiled programs)\n"
    # nothing compiles: nothing said
    quiet = io.StringIO()
    monkeypatch.setattr(console, "COMPILE_NOTE_S", 3600.0)
    progress = console.Progress("bare", 1, 1, True, stream=quiet, compile_note=console.CompileNote(True))
    progress.layer(0, 0, 1)
    assert quiet.getvalue() == ""


def test_compile_seconds_are_the_union_of_nested_spans():
    compile_clock.start()
    base = compile_clock.now() + 1000  # spans of a window no real compile falls in
    for a, b in ((0, 4), (1, 2), (3, 6), (8, 9)):  # nested and overlapping, as tracing inside tracing
        compile_clock.record_span(base + a, base + b)
    assert compile_clock.compile_seconds(base, base + 10) == 7
    assert compile_clock.compile_seconds(base + 5, base + 8.5) == 1.5


def test_ids_the_tokenizer_lacks_and_bytes_that_are_not_utf8_are_explained(tiny_checkpoints):
    tokenizer = load_tokenizer(tiny_checkpoints["kimi-k2.5"], 2048)
    assert console.text_notes(tokenizer, [5, 9]) == []
    lacking = console.text_notes(tokenizer, [5, 4000, 9])
    assert lacking == ["text: token id(s) 4000 are not in the tokenizer (the model's vocabulary is larger than the "
                       "tokenizer's) and are left out of the text"]  # fmt: skip
    stray = next(t for t in range(1792) if (b := tokenizer.token_bytes(t)) and len(b) == 1 and b[0] >= 0x80)
    notes = console.text_notes(tokenizer, [5, stray])
    assert notes == ["text: 1 byte sequence(s) of the generated tokens are not valid UTF-8 and are shown as U+FFFD; the "
                     "ledger's token_bytes holds every token's exact bytes"]  # fmt: skip
    log = io.StringIO()
    console.Progress("bare", 1, 1, True, tokenizer, stream=log).step(_step(0))
    assert "token 5 " in log.getvalue()
    log = io.StringIO()
    lacking_step = _step(0)
    lacking_step.token = 4000
    console.Progress("bare", 1, 1, True, tokenizer, stream=log).step(lacking_step)
    assert log.getvalue().startswith("bare step 0: token 4000 (not in the tokenizer), ")
