"""The YAML run manifest: schema, FILE:LINE:FIELD errors, overrides, paths, JSON Schema, digest."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import blake3
import jsonschema
import pydantic
import pytest
import yaml

from kimi_jax.errors import ManifestError
from kimi_jax.manifest import (
    Manifest,
    load_manifest,
    manifest_json_schema,
    parse_manifest_dict,
)

REPO = Path(__file__).resolve().parents[1]

# The manifest lives in <tmp>/cfg/, the checkpoint in <tmp>/ckpt/kimi/, and the tests run from
# <tmp>/elsewhere/, so a path resolved against the working directory would come out wrong.
GOOD = """\
version: 1
model:
  checkpoint: ../ckpt/kimi
prompt:
  tokens: [163584, 7, 9]
output:
  dir: ../runs/demo
"""


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line of ``text`` holding the ``occurrence``-th ``needle``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} not found in test manifest")


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace: a checkpoint dir with config.json, a manifest folder and a different cwd."""
    ckpt = tmp_path / "ckpt" / "kimi"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "ckpt" / "empty").mkdir()
    (tmp_path / "cfg").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("KIMI_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path


def write(ws: Path, text: str, name: str = "run.yaml") -> Path:
    path = ws / "cfg" / name
    path.write_text(text)
    return path


def error_lines(path: Path, text: str, overrides=(), out_dir=None) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(path, text), overrides, out_dir)
    return str(info.value).splitlines()


def assert_reported(lines: list[str], prefix: str, *fragments: str) -> str:
    hits = [line for line in lines if line.startswith(prefix)]
    assert hits, f"no error line starting with {prefix!r} in:\n" + "\n".join(lines)
    for fragment in fragments:
        assert any(fragment in hit for hit in hits), f"{fragment!r} missing from {hits}"
    return hits[0]


# ---------------------------------------------------------------------------------------------
# A good manifest.


def test_good_manifest_defaults_and_paths(ws: Path) -> None:
    path = write(ws, GOOD)
    m = load_manifest(path)
    assert isinstance(m, Manifest)
    assert m.version == 1
    assert m.source == path.resolve()
    # Relative paths resolve against the manifest's folder, not the working directory.
    assert m.model.checkpoint == (ws / "ckpt" / "kimi").resolve()
    assert m.output.dir == (ws / "runs" / "demo").resolve()
    assert isinstance(m.model.checkpoint, Path) and m.model.checkpoint.is_absolute()
    assert not (ws / "runs").exists()  # output dir need not exist
    assert m.model.synthetic is None
    assert m.model.cache_dir == (ws / "cache").resolve()  # $KIMI_JAX_CACHE
    assert m.prompt.tokens == [163584, 7, 9] and m.prompt.text is None
    # Defaults.
    assert m.compute.dtype == "float32"
    assert m.compute.dequant == "exact"
    assert m.storage.evict_page_cache is False
    assert m.storage.prefetch is True
    assert m.storage.io_retries == 3
    assert m.generate.max_new_tokens == 5
    assert m.generate.kv_cache is True  # fast by default: the KV cache, a budget of auto, the CPU kernels
    assert (m.storage.resident_bytes, m.compute.matmul) == ("auto", "kernels")
    assert m.capture == ["norms", "routing", "logits"]
    assert m.anchor is None
    # Frozen.
    with pytest.raises(pydantic.ValidationError):
        m.generate.max_new_tokens = 9  # type: ignore[misc]


def test_full_manifest_synthetic_anchor_cache_dir(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(ws / "home"))
    text = dedent(
        """
        version: 1
        model:
          synthetic:
            preset: small
            layout: deepseek-v3
            seed: 4
          cache_dir: ~/synth-cache
        compute:
          dtype: bfloat16
          dequant: bf16-rounded
        storage:
          evict_page_cache: true
          prefetch: false
          io_retries: 10
        prompt:
          text: "Hello: world"
        generate:
          max_new_tokens: 1
          kv_cache: true
        capture: []
        anchor: anchors/new/anchor.json
        output:
          dir: /abs/out
        """
    )
    m = load_manifest(write(ws, text))
    assert m.model.checkpoint is None
    assert m.model.synthetic is not None
    assert (m.model.synthetic.preset, m.model.synthetic.layout, m.model.synthetic.seed) == (
        "small",
        "deepseek-v3",
        4,
    )
    assert m.model.cache_dir == (ws / "home" / "synth-cache").resolve()
    assert (m.compute.dtype, m.compute.dequant) == ("bfloat16", "bf16-rounded")
    assert (m.storage.evict_page_cache, m.storage.prefetch, m.storage.io_retries) == (True, False, 10)
    assert m.prompt.text == "Hello: world" and m.prompt.tokens is None
    assert (m.generate.max_new_tokens, m.generate.kv_cache) == (1, True)
    assert m.capture == []
    # The anchor's parent directory need not exist.
    assert m.anchor == (ws / "cfg" / "anchors" / "new" / "anchor.json").resolve()
    assert m.output.dir == Path("/abs/out")


def test_synthetic_defaults_and_default_cache_dir(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_JAX_CACHE")
    monkeypatch.setenv("HOME", str(ws / "home"))
    text = GOOD.replace("checkpoint: ../ckpt/kimi", "synthetic: {preset: tiny}")
    m = load_manifest(write(ws, text))
    assert m.model.synthetic is not None
    assert (m.model.synthetic.layout, m.model.synthetic.seed) == ("kimi-k2.5", 0)
    assert m.model.cache_dir == (ws / "home" / ".cache" / "kimi-jax").resolve()


def test_resolved_dict_is_json_with_absolute_paths(ws: Path) -> None:
    m = load_manifest(write(ws, GOOD))
    data = m.resolved_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["model"]["checkpoint"] == str((ws / "ckpt" / "kimi").resolve())
    assert data["output"]["dir"] == str((ws / "runs" / "demo").resolve())
    assert data["generate"] == {"max_new_tokens": 5, "kv_cache": True}
    assert data["capture"] == ["norms", "routing", "logits"]
    assert data["version"] == 1


def test_locate_and_error_for_later_stages(ws: Path) -> None:
    text = dedent(
        """
        version: 1
        model:
          checkpoint: ../ckpt/kimi
        prompt:
          tokens:
            - 1
            - 2
            - 999
        output:
          dir: ../runs/demo
        """
    )
    path = write(ws, text)
    m = load_manifest(path)
    assert m.locate("prompt.tokens.2") == f"{path}:{line_of(text, '- 999')}"
    assert m.locate("model.checkpoint") == f"{path}:{line_of(text, 'checkpoint:')}"
    # A defaulted field falls back to its nearest written ancestor (here the top level).
    assert m.locate("generate.max_new_tokens") == f"{path}:1"
    err = m.error("prompt.tokens.2", "token id 999 is outside the vocabulary (vocab_size 512)")
    assert isinstance(err, ManifestError)
    assert str(err) == (
        f"{path}:{line_of(text, '- 999')}: prompt.tokens.2: "
        "token id 999 is outside the vocabulary (vocab_size 512)"
    )


# ---------------------------------------------------------------------------------------------
# Bad manifests: every error names FILE:LINE: FIELD.

# (id, manifest text, field, needle locating the expected line, fragments of the message)
BAD_CASES = [
    (
        "unknown-top-level-key",
        GOOD + "bogus: 1\n",
        "bogus",
        "bogus:",
        ["unknown key", "expected one of: version, model"],
    ),
    (
        "unknown-nested-key",
        GOOD + "generate:\n  max_new_token: 4\n",
        "generate.max_new_token",
        "max_new_token:",
        ["unknown key", "did you mean 'max_new_tokens'"],
    ),
    (
        "string-for-int",
        GOOD + 'generate:\n  max_new_tokens: "5"\n',
        "generate.max_new_tokens",
        "max_new_tokens:",
        ["expected an integer, got string '5'"],
    ),
    (
        "float-for-int",
        GOOD + "storage:\n  io_retries: 2.0\n",
        "storage.io_retries",
        "io_retries:",
        ["expected an integer, got float 2.0"],
    ),
    (
        "int-for-bool",
        GOOD + "generate:\n  kv_cache: 1\n",
        "generate.kv_cache",
        "kv_cache:",
        ["expected a boolean", "got integer 1"],
    ),
    (
        "max-new-tokens-zero",
        GOOD + "generate:\n  max_new_tokens: 0\n",
        "generate.max_new_tokens",
        "max_new_tokens:",
        ["must be >= 1, got 0"],
    ),
    (
        "max-new-tokens-negative",
        GOOD + "generate:\n  max_new_tokens: -1\n",
        "generate.max_new_tokens",
        "max_new_tokens:",
        ["must be >= 1, got -1"],
    ),
    (
        "io-retries-too-many",
        GOOD + "storage:\n  io_retries: 11\n",
        "storage.io_retries",
        "io_retries:",
        ["must be <= 10, got 11"],
    ),
    (
        "empty-token-list",
        GOOD.replace("tokens: [163584, 7, 9]", "tokens: []"),
        "prompt.tokens",
        "tokens:",
        ["non-empty"],
    ),
    (
        "negative-token-id",
        GOOD.replace("tokens: [163584, 7, 9]", "tokens:\n    - 5\n    - 6\n    - 7\n    - -3"),
        "prompt.tokens.3",
        "- -3",
        ["must be >= 0, got -3"],
    ),
    (
        "both-checkpoint-and-synthetic",
        GOOD.replace("model:\n", "model:\n  synthetic:\n    preset: tiny\n"),
        "model",
        "model:",
        ["exactly one of model.checkpoint / model.synthetic", "got both"],
    ),
    (
        "neither-checkpoint-nor-synthetic",
        GOOD.replace("checkpoint: ../ckpt/kimi", "cache_dir: ../cache"),
        "model",
        "model:",
        ["exactly one of model.checkpoint / model.synthetic", "got neither"],
    ),
    (
        "both-tokens-and-text",
        GOOD.replace("prompt:\n", "prompt:\n  text: hello\n"),
        "prompt",
        "prompt:",
        ["exactly one of prompt.tokens / prompt.text", "got both"],
    ),
    (
        "missing-output",
        GOOD.replace("output:\n  dir: ../runs/demo\n", ""),
        "output",
        "version:",  # a missing key is reported at its parent mapping: here the top level
        ["required", "output.dir"],
    ),
    (
        "missing-output-dir",
        GOOD.replace("output:\n  dir: ../runs/demo\n", "output: {}\n"),
        "output.dir",
        "output:",
        ["required"],
    ),
    (
        "missing-version",
        GOOD.replace("version: 1\n", ""),
        "version",
        "model:",
        ["required"],
    ),
    (
        "version-2",
        GOOD.replace("version: 1", "version: 2"),
        "version",
        "version:",
        ["unsupported manifest version integer 2", "version 1"],
    ),
    (
        "version-true",
        GOOD.replace("version: 1", "version: true"),
        "version",
        "version:",
        ["unsupported manifest version boolean true"],
    ),
    (
        "version-string",
        GOOD.replace("version: 1", 'version: "1"'),
        "version",
        "version:",
        ["unsupported manifest version string '1'"],
    ),
    (
        "bad-capture-enum",
        GOOD + "capture: [norms, attention]\n",
        "capture.1",
        "capture:",
        ["must be one of 'norms', 'routing' or 'logits'", "'attention'"],
    ),
    (
        "duplicate-capture",
        GOOD + "capture:\n  - norms\n  - logits\n  - norms\n",
        "capture",
        "capture:",
        ["duplicate entry 'norms'"],
    ),
    (
        "bad-dtype-enum",
        GOOD + "compute:\n  dtype: float16\n",
        "compute.dtype",
        "dtype:",
        ["must be one of 'float32' or 'bfloat16'", "got string 'float16'"],
    ),
    (
        "bad-dequant-enum",
        GOOD + "compute:\n  dtype: float32\n  dequant: bf16\n",
        "compute.dequant",
        "dequant:",
        ["must be one of 'exact' or 'bf16-rounded'", "got string 'bf16'"],
    ),
    (
        "dequant-not-a-string",
        GOOD + "compute: {dequant: true}\n",
        "compute.dequant",
        "compute:",
        ["must be one of 'exact' or 'bf16-rounded'", "got boolean true"],
    ),
    (
        "bad-preset-enum",
        GOOD.replace("checkpoint: ../ckpt/kimi", "synthetic:\n    preset: huge"),
        "model.synthetic.preset",
        "preset:",
        ["'tiny', 'small', 'full-shape' or 'full-shape-routed'", "got string 'huge'"],
    ),
    (
        "bad-layout-enum",
        GOOD.replace("checkpoint: ../ckpt/kimi", "synthetic:\n    preset: tiny\n    layout: llama"),
        "model.synthetic.layout",
        "layout:",
        ["'kimi-k2.5'", "got string 'llama'"],
    ),
    (
        "negative-seed",
        GOOD.replace("checkpoint: ../ckpt/kimi", "synthetic: {preset: tiny, seed: -1}"),
        "model.synthetic.seed",
        "synthetic:",
        ["must be >= 0, got -1"],
    ),
    (
        "section-not-a-mapping",
        GOOD + "generate: 5\n",
        "generate",
        "generate:",
        ["expected a mapping, got integer 5"],
    ),
    (
        "output-dir-not-a-string",
        GOOD.replace("dir: ../runs/demo", "dir: 42"),
        "output.dir",
        "dir:",
        ["expected a path string, got integer 42"],
    ),
    (
        "tokens-and-chat",
        GOOD.replace("  tokens: [163584, 7, 9]\n", "  tokens: [163584, 7, 9]\n  chat:\n    - {role: user, content: hi}\n"),
        "prompt",
        "prompt:",
        ["exactly one of prompt.tokens / prompt.text / prompt.chat may be set, got both tokens and chat"],
    ),
    (
        "chat-message-content-not-a-string",
        GOOD.replace("  tokens: [163584, 7, 9]\n", "  chat:\n    - role: user\n      content: [1, 2]\n"),
        "prompt.chat.0.content",
        "content:",
        ["expected a string, got a list"],
    ),
    (
        "chat-message-unknown-key",
        GOOD.replace("  tokens: [163584, 7, 9]\n", "  chat:\n    - role: user\n      content: hi\n      image: x.png\n"),
        "prompt.chat.0.image",
        "image:",
        ["unknown key"],
    ),
    (
        "chat-empty",
        GOOD.replace("  tokens: [163584, 7, 9]\n", "  chat: []\n"),
        "prompt.chat",
        "chat:",
        ["must be a non-empty list"],
    ),
    (
        "template-kwargs-without-chat",
        GOOD.replace("  tokens: [163584, 7, 9]\n", "  tokens: [163584, 7, 9]\n  chat_template_kwargs: {thinking: false}\n"),
        "prompt",
        "prompt:",
        ["prompt.chat_template_kwargs applies only to prompt.chat"],
    ),
    (
        "sampling-temperature-zero",
        GOOD + "generate:\n  sampling:\n    temperature: 0\n",
        "generate.sampling.temperature",
        "temperature:",
        ["must be > 0"],
    ),
    (
        "sampling-top-p-above-one",
        GOOD + "generate:\n  sampling: {top_p: 1.5, seed: 3}\n",
        "generate.sampling.top_p",
        "sampling:",
        ["must be <= 1"],
    ),
    (
        "sampling-seed-too-large",
        GOOD + "generate:\n  sampling:\n    seed: 18446744073709551616\n",
        "generate.sampling.seed",
        "seed:",
        ["must be < 18446744073709551616"],
    ),
    (
        "sampling-unknown-key",
        GOOD + "generate:\n  sampling:\n    temprature: 0.7\n",
        "generate.sampling.temprature",
        "temprature:",
        ["did you mean 'temperature'?"],
    ),
    (
        "stop-string-empty",
        GOOD + "generate:\n  stop: ['']\n",
        "generate.stop.0",
        "stop:",
        ["must be a non-empty string"],
    ),
]


@pytest.mark.parametrize(
    "text, field, needle, fragments", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_manifest_names_file_line_field(
    ws: Path, text: str, field: str, needle: str, fragments: list[str]
) -> None:
    path = ws / "cfg" / "run.yaml"
    lines = error_lines(ws, text)
    assert_reported(lines, f"{path}:{line_of(text, needle)}: {field}: ", *fragments)
    # Every line of the error has the FILE:LINE: FIELD: form.
    for line in lines:
        assert line.startswith(f"{path}:"), line


def test_text_fields_are_left_out_of_the_identity_until_used(ws: Path) -> None:
    """Manifests that use none of chat, sampling, stop and ignore_eos keep the identity they had."""
    m = load_manifest(write(ws, GOOD))
    assert m.resolved_dict()["prompt"] == {"tokens": [163584, 7, 9], "text": None}
    assert m.resolved_dict()["generate"] == {"max_new_tokens": 5, "kv_cache": True}
    chat = GOOD.replace("  tokens: [163584, 7, 9]\n", "  chat:\n    - {role: user, content: hi}\n"
                        "  chat_template_kwargs: {thinking: false}\n")  # fmt: skip
    used = load_manifest(write(ws, chat + "generate:\n  sampling: {temperature: 0.7}\n  stop: [END]\n"
                                          "  ignore_eos: true\n", "used.yaml"))  # fmt: skip
    resolved = used.resolved_dict()
    assert resolved["prompt"]["chat"] == [{"role": "user", "content": "hi"}]
    assert resolved["prompt"]["chat_template_kwargs"] == {"thinking": False}
    assert resolved["generate"]["sampling"] == {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0}
    assert resolved["generate"]["stop"] == ["END"] and resolved["generate"]["ignore_eos"] is True
    base = load_manifest(write(ws, chat, "chat.yaml")).digest()
    for override in ("generate.sampling.seed=1", "generate.stop=[x]", "generate.ignore_eos=true"):
        assert load_manifest(write(ws, chat, "chat.yaml"), [override]).digest() != base, override


def test_nonexistent_checkpoint_names_resolved_path(ws: Path) -> None:
    text = GOOD.replace("../ckpt/kimi", "../ckpt/missing")
    lines = error_lines(ws, text)
    resolved = (ws / "ckpt" / "missing").resolve()
    assert_reported(
        lines,
        f"{ws / 'cfg' / 'run.yaml'}:{line_of(text, 'checkpoint:')}: model.checkpoint: ",
        f"{resolved} does not exist",
    )


def test_checkpoint_without_config_json(ws: Path) -> None:
    text = GOOD.replace("../ckpt/kimi", "../ckpt/empty")
    lines = error_lines(ws, text)
    resolved = (ws / "ckpt" / "empty").resolve()
    assert_reported(
        lines,
        f"{ws / 'cfg' / 'run.yaml'}:{line_of(text, 'checkpoint:')}: model.checkpoint: ",
        f"{resolved} has no config.json",
    )


def test_checkpoint_that_is_a_file(ws: Path) -> None:
    (ws / "ckpt" / "file").write_text("x")
    text = GOOD.replace("../ckpt/kimi", "../ckpt/file")
    lines = error_lines(ws, text)
    assert_reported(
        lines,
        f"{ws / 'cfg' / 'run.yaml'}:{line_of(text, 'checkpoint:')}: model.checkpoint: ",
        "is not a directory",
    )


def test_all_errors_reported_at_once_in_line_order(ws: Path) -> None:
    text = dedent(
        """
        version: 1
        model:
          checkpoint: ../ckpt/kimi
          colour: blue
        prompt:
          tokens: [1, -2]
        generate:
          max_new_tokens: 0
          kv_cache: "yes"
        output:
          dir: ../runs/demo
        """
    )
    path = ws / "cfg" / "run.yaml"
    lines = error_lines(ws, text)
    expected = [
        f"{path}:{line_of(text, 'colour:')}: model.colour: ",
        f"{path}:{line_of(text, 'tokens:')}: prompt.tokens.1: ",
        f"{path}:{line_of(text, 'max_new_tokens:')}: generate.max_new_tokens: ",
        f"{path}:{line_of(text, 'kv_cache:')}: generate.kv_cache: ",
    ]
    assert len(lines) == len(expected), lines
    for line, prefix in zip(lines, expected):
        assert line.startswith(prefix), (line, prefix)


# ---------------------------------------------------------------------------------------------
# Reading the file.


def test_yaml_syntax_error_reports_its_line(ws: Path) -> None:
    text = GOOD.replace("dir: ../runs/demo", "dir: ../runs: demo")
    path = write(ws, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}:{line_of(text, 'dir:')}: YAML syntax error")


def test_unclosed_flow_sequence_is_a_syntax_error(ws: Path) -> None:
    text = GOOD.replace("[163584, 7, 9]", "[163584, 7, 9")
    with pytest.raises(ManifestError, match=r"run\.yaml:\d+: YAML syntax error"):
        load_manifest(write(ws, text))


def test_python_tags_are_rejected_not_executed(ws: Path) -> None:
    marker = ws / "pwned"
    text = GOOD + f'anchor: !!python/object/apply:os.mkdir ["{marker}"]\n'
    path = write(ws, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_of(text, 'anchor:')}: YAML error")
    assert "python/object/apply:os.mkdir" in message
    assert not marker.exists()


def test_python_object_tag_rejected(ws: Path) -> None:
    text = GOOD + "generate: !!python/object:collections.OrderedDict {}\n"
    path = write(ws, text)
    with pytest.raises(ManifestError, match=rf"run\.yaml:{line_of(text, 'generate:')}: YAML error"):
        load_manifest(path)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file(ws: Path, text: str) -> None:
    path = write(ws, text)
    with pytest.raises(ManifestError, match="manifest is empty") as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}:")


def test_top_level_must_be_a_mapping(ws: Path) -> None:
    path = write(ws, "# comment\n- version: 1\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}:2: the top level must be a mapping")


def test_missing_file(ws: Path) -> None:
    with pytest.raises(ManifestError, match=r"nope\.yaml: manifest file not found"):
        load_manifest(ws / "cfg" / "nope.yaml")


def test_duplicate_key_is_an_error(ws: Path) -> None:
    text = GOOD + "generate:\n  max_new_tokens: 3\n  max_new_tokens: 4\n"
    path = write(ws, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    first = line_of(text, "max_new_tokens:", 1)
    second = line_of(text, "max_new_tokens:", 2)
    assert str(info.value) == (
        f"{path}:{second}: generate.max_new_tokens: duplicate key (first given on line {first})"
    )


def test_display_path_is_as_given(ws: Path) -> None:
    write(ws, GOOD + "bogus: 1\n")
    with pytest.raises(ManifestError) as info:
        load_manifest("../cfg/run.yaml")  # relative to the cwd <tmp>/elsewhere
    assert str(info.value).startswith(f"../cfg/run.yaml:{line_of(GOOD + 'bogus: 1', 'bogus:')}: bogus: ")


# ---------------------------------------------------------------------------------------------
# Overrides and --out.


def test_overrides_set_nested_values_with_types(ws: Path) -> None:
    path = write(ws, GOOD)
    m = load_manifest(
        path,
        [
            "generate.max_new_tokens=8",
            "generate.kv_cache=true",
            "prompt.tokens=[1,2,3]",
            "compute.dtype=bfloat16",
            "capture=[logits]",
            "storage.io_retries=0",
            "anchor=anchors/a.json",
        ],
    )
    assert m.generate.max_new_tokens == 8
    assert m.generate.kv_cache is True
    assert m.prompt.tokens == [1, 2, 3]
    assert m.compute.dtype == "bfloat16"
    assert m.capture == ["logits"]
    assert m.storage.io_retries == 0
    assert m.anchor == (ws / "cfg" / "anchors" / "a.json").resolve()
    assert m.locate("generate.max_new_tokens") == "--set generate.max_new_tokens=8"
    assert m.locate("prompt.tokens.1") == "--set prompt.tokens=[1,2,3]"
    assert m.locate("output.dir") == f"{path}:{line_of(GOOD, 'dir:')}"


def test_overrides_switch_model_and_prompt_kind(ws: Path) -> None:
    m = load_manifest(
        write(ws, GOOD),
        [
            "model.checkpoint=null",
            "model.synthetic.preset=tiny",
            "model.synthetic.seed=3",
            "prompt.tokens=null",
            "prompt.text=hello world",
        ],
    )
    assert m.model.checkpoint is None
    assert m.model.synthetic is not None
    assert (m.model.synthetic.preset, m.model.synthetic.seed) == ("tiny", 3)
    assert m.prompt.text == "hello world" and m.prompt.tokens is None


def test_override_value_error_names_the_override(ws: Path) -> None:
    lines = error_lines(ws, GOOD, ["generate.max_new_tokens=0"])
    assert lines == ["--set generate.max_new_tokens=0: generate.max_new_tokens: must be >= 1, got 0"]


def test_override_wrong_type_names_the_override(ws: Path) -> None:
    lines = error_lines(ws, GOOD, ["generate.max_new_tokens='8'", "prompt.tokens=[1, x]"])
    assert_reported(
        lines,
        "--set generate.max_new_tokens='8': generate.max_new_tokens: ",
        "expected an integer, got string '8'",
    )
    assert_reported(lines, "--set prompt.tokens=[1, x]: prompt.tokens.1: ", "expected an integer")


def test_override_creating_unknown_key_is_validated(ws: Path) -> None:
    lines = error_lines(ws, GOOD, ["generate.temperature=0.5", "extra.deep.key=1"])
    assert_reported(lines, "--set generate.temperature=0.5: generate.temperature: ", "unknown key")
    assert_reported(lines, "--set extra.deep.key=1: extra: ", "unknown key")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("generate.max_new_tokens", "expected KEY=VALUE"),
        ("=5", "key before '=' is empty"),
        ("generate..kv_cache=true", "empty segment"),
        ("prompt.tokens.first=1", "prompt.tokens is a list, not a mapping"),
        ("generate.max_new_tokens.x=1", "generate.max_new_tokens is"),
        ("prompt.text=[1, 2", "not valid YAML"),
        ("prompt.text=key: value", "not a YAML scalar or flow value"),
        ("prompt.text=!!python/object/apply:os.getcwd []", "not valid YAML"),
    ],
)
def test_malformed_override_is_named(ws: Path, override: str, fragment: str) -> None:
    text = GOOD + "generate:\n  max_new_tokens: 4\n"
    lines = error_lines(ws, text, [override])
    assert_reported(lines, f"--set {override}: ", fragment)


def test_out_dir_replaces_output_dir_relative_to_cwd(ws: Path) -> None:
    m = load_manifest(write(ws, GOOD), out_dir="my-out")
    assert m.output.dir == (ws / "elsewhere" / "my-out").resolve()
    assert m.locate("output.dir") == "--out my-out"
    # --out also supplies a missing output section.
    m2 = load_manifest(write(ws, GOOD.replace("output:\n  dir: ../runs/demo\n", "")), out_dir="o2")
    assert m2.output.dir == (ws / "elsewhere" / "o2").resolve()


def test_out_dir_wins_over_set(ws: Path) -> None:
    m = load_manifest(write(ws, GOOD), ["output.dir=from-set"], out_dir="from-out")
    assert m.output.dir == (ws / "elsewhere" / "from-out").resolve()


# ---------------------------------------------------------------------------------------------
# Programmatic use.


def test_parse_manifest_dict(ws: Path) -> None:
    data = yaml.safe_load(GOOD)
    m = parse_manifest_dict(data, base_dir=ws / "cfg")
    assert m.model.checkpoint == (ws / "ckpt" / "kimi").resolve()
    assert m.source is None
    data["generate"] = {"max_new_tokens": 0}
    with pytest.raises(ManifestError) as info:
        parse_manifest_dict(data, source="api", base_dir=ws / "cfg")
    assert str(info.value) == "api: generate.max_new_tokens: must be >= 1, got 0"


# ---------------------------------------------------------------------------------------------
# JSON Schema.


def test_json_schema_is_valid_and_strict(ws: Path) -> None:
    schema = manifest_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"]
    assert schema["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)

    good = yaml.safe_load(GOOD)
    validator.validate(good)
    synthetic = yaml.safe_load(GOOD.replace("checkpoint: ../ckpt/kimi", "synthetic: {preset: tiny}"))
    validator.validate(synthetic)
    # The loaded-and-resolved form is valid too.
    validator.validate(load_manifest(write(ws, GOOD)).resolved_dict())

    for bad in (
        {**good, "bogus": 1},
        {**good, "generate": {"max_new_token": 3}},
        {**good, "generate": {"max_new_tokens": 0}},
        {**good, "generate": {"kv_cache": 1}},
        {**good, "version": 2},
        {**good, "capture": ["norms", "norms"]},
        {**good, "compute": {"dequant": "bf16"}},
        {**good, "model": {"checkpoint": "x", "synthetic": {"preset": "tiny"}}},
        {key: value for key, value in good.items() if key != "output"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


SHIPPED = sorted((REPO / "manifests").glob("*.yaml")) + sorted((REPO / "manifests").glob("*.yml"))


@pytest.mark.skipif(not SHIPPED, reason="no example manifests shipped yet")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_json_schema_validates_shipped_examples(path: Path) -> None:
    jsonschema.Draft202012Validator(manifest_json_schema()).validate(
        yaml.safe_load(path.read_text())
    )


# ---------------------------------------------------------------------------------------------
# Digest.


def test_digest_stable_and_sensitive(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(ws, GOOD)
    first = load_manifest(path)
    digest = first.digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    canonical = json.dumps(first.identity_dict(), sort_keys=True, separators=(",", ":"))
    assert digest == blake3.blake3(canonical.encode()).hexdigest()
    assert "output" not in first.identity_dict() and "cache_dir" not in first.identity_dict()["model"]
    # Where the run is written does not change what it is.
    assert load_manifest(path, out_dir=str(ws / "elsewhere")).digest() == digest
    assert load_manifest(path).digest() == digest
    # Same resolved content from another working directory, and with defaults spelled out.
    monkeypatch.chdir(ws)
    assert load_manifest(path).digest() == digest
    spelled = GOOD + ("generate:\n  max_new_tokens: 5\n  kv_cache: true\ncapture: [norms, routing, logits]\n"
                      "compute: {matmul: kernels}\nstorage: {resident_bytes: auto}\n")
    assert load_manifest(write(ws, spelled, "spelled.yaml")).digest() == digest
    # Any value change changes it.
    assert load_manifest(path, ["generate.max_new_tokens=6"]).digest() != digest
    assert load_manifest(path, ["capture=[norms, routing]"]).digest() != digest
    # The dequantization mode is part of what a run is: spelled-out default same, the other mode not.
    assert load_manifest(path, ["compute.dequant=exact"]).digest() == digest
    rounded = load_manifest(path, ["compute.dequant=bf16-rounded"])
    assert rounded.resolved_dict()["compute"] == {"dtype": "float32", "dequant": "bf16-rounded", "matmul": "kernels"}
    assert rounded.digest() != digest
    assert load_manifest(write(ws, GOOD.replace("7, 9", "7, 8"), "other.yaml")).digest() != digest


def _field_paths(cls, prefix=()):
    """Every dotted field path of a manifest section class, sub-sections walked."""
    from kimi_jax.manifest.fields import model_in

    for name, info in cls.model_fields.items():
        path = (*prefix, name)
        yield path
        sub = model_in(info.annotation)
        if sub is not None:
            yield from _field_paths(sub, path)


def test_every_manifest_field_declares_its_effect_on_results():
    """compare classifies differences by what the schema declares; a field declaring nothing would
    be reported as "not known to leave results unchanged", so none may be left undeclared."""
    from kimi_jax.manifest import field_effect

    paths = [".".join(p) for p in _field_paths(Manifest)]
    assert "storage.remote.timeout_s" in paths and "generate.sampling.seed" in paths
    undeclared = [p for p in paths if field_effect(p) is None]
    assert undeclared == []
    assert field_effect("model.cache_dir").kind == "neutral"  # a neutral field inside a result section
    assert field_effect("model.synthetic.seed").kind == "result"
    assert field_effect("storage.resident_bytes").kind == "neutral"  # a section's own declaration
    assert field_effect("compute.mesh.placement").kind == "result"
    assert field_effect("prompt.chat.0.content").kind == "result"  # list items inherit
    assert field_effect("no.such.field") is None


def test_fields_added_later_stay_out_of_the_identity_at_what_they_meant_before():
    data = yaml.safe_load(GOOD)
    data["model"] = {"synthetic": {"preset": "tiny"}}
    plain = parse_manifest_dict(data)
    resolved = plain.resolved_dict()
    assert "speculate" not in resolved["storage"]  # at its default, which is what it always meant
    changed = parse_manifest_dict({**data, "storage": {"speculate": True}})
    assert changed.resolved_dict()["storage"]["speculate"] is True
    assert changed.digest() != plain.digest()
    # a changed default: saying nothing now means kernels and auto, recorded (a new identity); the
    # old behaviour, spelled out, is left out as it always was, so it keeps its old identity
    assert (resolved["compute"]["matmul"], resolved["storage"]["resident_bytes"]) == ("kernels", "auto")
    old = parse_manifest_dict({**data, "compute": {"matmul": "widened"}, "storage": {"resident_bytes": 0}})
    assert "matmul" not in old.resolved_dict()["compute"] and "resident_bytes" not in old.resolved_dict()["storage"]
    # and a recorded manifest.json that leaves them out is read as the run it records
    from kimi_jax.manifest import recorded_manifest

    recorded = recorded_manifest(old.resolved_dict())
    assert (recorded["compute"]["matmul"], recorded["storage"]["resident_bytes"]) == ("widened", 0)
    assert parse_manifest_dict(recorded).digest() == old.digest() != plain.digest()


# ---------------------------------------------------------------------------------------------
# Numbers a stranger (or a typo) can write: named at load, never an internal error after compute.


@pytest.mark.parametrize("field, value", [
    ("storage.remote.timeout_s", ".inf"), ("storage.remote.cache_gib", ".inf"), ("distributed.timeout_s", ".inf"),
    ("generate.sampling.temperature", ".nan"), ("generate.sampling.top_p", "-.inf"),
])  # fmt: skip
def test_non_finite_settings_are_refused_at_load(ws: Path, field: str, value: str) -> None:
    """Main accepted them and failed with an internal error once the resolved manifest was written."""
    (line,) = error_lines(ws, GOOD, [f"{field}={value}"])
    shown = {".inf": "inf", "-.inf": "-inf", ".nan": "nan"}[value]
    assert line == f"--set {field}={value}: {field}: must be a finite number, got float {shown}"


def test_integers_past_pythons_digit_limit_are_named(ws: Path) -> None:
    """Python refuses to read integers of more than 4,300 digits (ValueError): main let that
    through as an internal error, from the manifest file and from --set alike."""
    huge = "9" * 5000
    (line,) = error_lines(ws, GOOD.replace("[163584, 7, 9]", f"[163584, {huge}]"))
    assert line == f"{ws / 'cfg' / 'run.yaml'}:5: YAML error: an integer of 5,000 digits; no manifest field holds more " \
        "than 40"  # fmt: skip
    (line,) = error_lines(ws, GOOD, [f"generate.max_new_tokens={huge}"])
    assert line.endswith("is not valid YAML: an integer of 5,000 digits; no manifest field holds more than 40")
    assert len(line) < 400


def test_a_number_in_exponent_form_is_a_number(ws: Path) -> None:
    """YAML 1.1 reads 1e-300 (no dot) as a string: main refused --set ...temperature=1e-300."""
    manifest = load_manifest(write(ws, GOOD), ["generate.sampling.temperature=1e-300", "generate.sampling.seed=1"])
    assert manifest.generate.sampling.temperature == 1e-300
    manifest = load_manifest(write(ws, GOOD), ["generate.sampling.temperature=2E+1"])
    assert manifest.generate.sampling.temperature == 20.0
    assert load_manifest(write(ws, GOOD), ["prompt.text='1e5'", "prompt.tokens=null"]).prompt.text == "1e5"
