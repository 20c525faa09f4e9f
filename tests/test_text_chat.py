"""Chat templates: rendered as transformers renders them, inside jinja2's sandbox, errors named."""

from __future__ import annotations

import shutil

import pytest

from kimi_jax.errors import TokenizerError
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.text.chat import end_of_turn_token, render_chat
from kimi_jax.text.tokenizer import load_tokenizer

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
