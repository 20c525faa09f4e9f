"""Chat templates: rendered as transformers renders them, inside jinja2's sandbox, errors named."""

from __future__ import annotations

import shutil
import time

import pytest

from kimi_jax.errors import TokenizerError
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.text.chat import end_of_turn_token, render_chat
from kimi_jax.text.tokenizer import load_tokenizer

RENDER_SECONDS = 10  # the worker's wall-time limit on one rendering (kimi_jax/text/worker.py)

CHATS = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|> {{ 7*7 }}"},
     {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "Again, 你好"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synth_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", "tiny", "kimi-k2.5")


@pytest.fixture
def folder(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "ckpt", ignore=shutil.ignore_patterns("*.safetensors"))


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_as_transformers_does(ckpt, messages, generation_prompt):
    oracle = pytest.importorskip("transformers.utils.chat_template_utils")
    tokenizer = load_tokenizer(ckpt, 2048)
    template = (ckpt / "chat_template.jinja").read_text()
    (want,), _ = oracle.render_jinja_template(conversations=[messages], chat_template=template,
                                              add_generation_prompt=generation_prompt, bos_token="[BOS]",
                                              eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]")  # fmt: skip
    assert render_chat(tokenizer, messages, generation_prompt) == want


def test_kimi_format_and_end_of_turn(ckpt):
    tokenizer = load_tokenizer(ckpt, 2048)
    text = render_chat(tokenizer, CHATS[1])
    assert text.startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>")
    assert text.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert "{{ 7*7 }}" in text, "message content is data, never template source"
    assert end_of_turn_token(tokenizer) == tokenizer.token_id("<|im_end|>")


def test_template_from_tokenizer_config_and_kwargs(folder):
    config = (folder / "tokenizer_config.json").read_text()
    (folder / "chat_template.jinja").unlink()
    template = '"{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}{{ mode | tojson }}"'
    (folder / "tokenizer_config.json").write_text(config[:-2] + f',\n  "chat_template": {template}\n}}\n')
    tokenizer = load_tokenizer(folder, 2048)
    assert render_chat(tokenizer, CHATS[0], template_kwargs={"mode": "<fast>"}) == 'user=Tell me a story.;"<fast>"'


@pytest.mark.parametrize("template, expected", [
    ("{{ messages.__class__.__mro__ }}", r"SecurityError|UndefinedError"),
    ("{{ ().__class__.__base__.__subclasses__() }}", r"SecurityError|UndefinedError"),
    ("{{ raise_exception('no tools here') }}",
     r"chat_template.jinja: the chat template failed: TemplateError: no tools here"),
    ("{{ strftime_now('%Y') }}", r"chat_template.jinja: the chat template failed"),
    ("{% for %}", r"TemplateSyntaxError"),
    ("{% set x = messages.append(1) %}", r"SecurityError"),
])  # fmt: skip
def test_hostile_or_broken_templates_fail_cleanly(folder, template, expected):
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(TokenizerError, match=expected):
        render_chat(load_tokenizer(folder, 2048), CHATS[0])


def test_no_template(folder):
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match=r"ships no chat template .* give the prompt as prompt.text"):
        render_chat(load_tokenizer(folder, 2048), CHATS[0])


# -- the bounds: every hostile template ends in one named error, within the worker's limits ------

HOSTILE = [
    # the audit's cases: each grew without bound on main (GiBs, or never finished)
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
     "the rendered text is longer than the 4,194,304 characters a chat template may produce"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "range(): the ranges of this rendering would hand out 10,100,000 numbers"),
    ("{{ lipsum(10**7) }}", "lipsum(): argument 10000000 is larger than the 100,000 a template may pass"),
    ("{{ 10 ** (10 ** 10) }}", "the operator '**' on 10 and 10000000000 would build a number of more than 65,536 bits"),
    ("{{ 'x' * 10**10 }}", "the operator '*' would build 10,000,000,000 characters or items"),
    ("{{ messages * 10**9 }}", "the operator '*' would build 1,000,000,000 characters or items"),
    ("{{ range(10**9) }}", "range(): argument 1000000000 is larger than the 100,000"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion too deep"),
    # more of the same kind, refused before they are computed
    ("{{ 'x'|center(10**9) }}", "the filter 'center': argument 1000000000"),
    ("{{ '%1000000000s' % 'x' }}", "width or precision 1000000000 is larger than 100,000"),
    ("{{ '{:>1000000000}'.format('x') }}", "str.format(): width or precision 1000000000"),
    ("{{ 'ab'.replace('', 'x' * 100000) }}" * 20, "the rendered text is longer"),
    ("{{ ([('x' * 100000)] * 1000)|join('') }}", "the filter 'join' would build 100,000,000 characters"),
    ("{{ messages|tojson(indent=100000) }}", "the filter 'tojson': indent 100000 is more than 16"),
]  # fmt: skip


@pytest.mark.parametrize("template, expected", HOSTILE)
def test_hostile_templates_end_in_named_errors_before_they_grow(folder, template, expected):
    (folder / "chat_template.jinja").write_text(template)
    tokenizer = load_tokenizer(folder, 2048)
    started = time.monotonic()
    with pytest.raises(TokenizerError) as e:
        render_chat(tokenizer, CHATS[0])
    assert str(e.value).startswith(f"{folder / 'chat_template.jinja'}: the chat template failed: ")
    assert expected in str(e.value)
    assert time.monotonic() - started < RENDER_SECONDS  # refused by the sandbox, not by the time limit
    tokenizer.close()


def test_what_the_sandbox_cannot_see_is_bounded_by_the_worker(folder, monkeypatch):
    """A loop that outputs nothing runs into the wall-time limit; a string doubled by '~' into the
    worker's memory limit; either way one named line, and the worker is replaced for the next call."""
    from kimi_jax.text import chat as chat_mod
    from kimi_jax.text import worker as worker_mod

    monkeypatch.setattr(worker_mod, "WORKER_MEMORY", 256 << 20)
    monkeypatch.setattr(chat_mod, "RENDER_SECONDS", 2.0)
    (folder / "chat_template.jinja").write_text(
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}")
    tokenizer = load_tokenizer(folder, 2048)
    with pytest.raises(TokenizerError, match=r"the chat template failed: needs more than the 256 MiB of memory"):
        render_chat(tokenizer, CHATS[0])
    (folder / "chat_template.jinja").write_text("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
                                                "{% endfor %}{% endfor %}")  # fmt: skip
    tokenizer = load_tokenizer(folder, 2048)
    started = time.monotonic()
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: the chat template did not finish within 2 s"):
        render_chat(tokenizer, CHATS[0])
    assert time.monotonic() - started < 2.0 + 3
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert render_chat(load_tokenizer(folder, 2048), CHATS[0]) == "Tell me a story."


def test_a_template_message_is_capped(folder):
    """raise_exception('E' * 10**6) made a 1 MB error line on main."""
    (folder / "chat_template.jinja").write_text("{{ raise_exception('E' * 10**6) }}")
    with pytest.raises(TokenizerError) as e:
        render_chat(load_tokenizer(folder, 2048), CHATS[0])
    assert "TemplateError: EEEE" in str(e.value) and "(1,000,000 characters)" in str(e.value)
    assert len(str(e.value)) < 600


def test_a_template_that_renders_no_tokens_is_a_named_manifest_error(ckpt, tmp_path):
    """Main went on with an empty prompt and ended in an internal error."""
    from kimi_jax.errors import ManifestError
    from kimi_jax.manifest import parse_manifest_dict
    from kimi_jax.run.plan import prepare_run
    from tests.hostile import checkpoint_like

    folder = checkpoint_like(ckpt, tmp_path / "ckpt")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").write_text("{% if false %}x{% endif %}")
    manifest = {"version": 1, "model": {"checkpoint": str(folder)}, "prompt": {"chat": CHATS[0]},
                "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    with pytest.raises(ManifestError, match="prompt.chat: the chat template rendered 0 characters that encode to no "
                                            "tokens; a prompt needs at least one token"):  # fmt: skip
        prepare_run(parse_manifest_dict(manifest, source=str(tmp_path / "m.yaml")))
