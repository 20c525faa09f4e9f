"""What a request may ask (kimi_jax.serve.api), and Kimi's tool calls read out of generated text
(kimi_jax.text.tool_calls) and answered in the OpenAI API's shape, whole and streamed, as the
official ``openai`` package's types read them."""

from __future__ import annotations

import types

import numpy as np
import pytest

from kimi_jax.serve.api import ApiError, read_request
from kimi_jax.serve.replies import Reply, chunk, completion
from kimi_jax.storage.synth import synth_checkpoint
from kimi_jax.text.tokenizer import load_tokenizer
from kimi_jax.text.tool_calls import parse_tool_calls

# what Kimi K2 writes when it calls two tools after a sentence
GENERATED = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             "<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_call_begin|>functions.web.search:1"
             "<|tool_call_argument_begin|>{\"q\": \"a|b\"}<|tool_call_end|><|tool_calls_section_end|>")  # fmt: skip
WANT = [{"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "functions.web.search:1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"a|b\"}"}}]  # fmt: skip


def test_a_whole_turn_parses_into_text_and_calls():
    text, calls = parse_tool_calls(GENERATED)
    assert text == "Let me check." and [c.as_api() for c in calls] == WANT
    assert parse_tool_calls("no calls <|tool_calls") == ("no calls <|tool_calls", [])  # a marker's start, never finished
    unfinished = GENERATED.split("<|tool_call_end|>")[0]
    assert parse_tool_calls(unfinished) == ("Let me check.", [])  # a call cut off by the token budget is dropped


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = synth_checkpoint(tmp_path_factory.mktemp("ckpt") / "k", "tiny", "kimi-k2.5", seed=0)
    return load_tokenizer(root)


def steps_of(tokenizer, text: str) -> list:
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokens) == text
    return [types.SimpleNamespace(token=t, logits=np.zeros(8, np.float32)) for t in tokens]


def test_the_api_reads_the_calls_whole_and_streamed(tokenizer):
    openai = pytest.importorskip("openai")
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [{"type": "function",
                                                                             "function": {"name": "get_weather"}}]}  # fmt: skip
    request = read_request(body, chat=True, default_seed=0)
    assert request.tool_calls and request.prompt["tools"] == body["tools"]
    steps = steps_of(tokenizer, GENERATED)
    whole = Reply(request, tokenizer, (), 5)
    for step in steps:
        whole.add(step)
    whole.close()
    parsed = openai.types.chat.ChatCompletion.model_validate(
        completion(whole, "chatcmpl-x", "m", whole.finish_reason({"reason": "end_of_turn"}), {}))  # fmt: skip
    assert parsed.choices[0].finish_reason == "tool_calls" and parsed.choices[0].message.content == "Let me check."
    assert [c.model_dump() for c in parsed.choices[0].message.tool_calls] == WANT

    streamed = Reply(request, tokenizer, (), 5)
    text, calls = "", {}
    events = []
    for step in steps:
        before = len(streamed.calls)
        shown, made = streamed.add(step)
        events.append(chunk(streamed, "chatcmpl-x", "m", shown, calls=list(enumerate(made, before))))
    for event in events:
        delta = openai.types.chat.ChatCompletionChunk.model_validate(event).choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            calls[call.index] = {"id": call.id, "type": call.type, "function": call.function.model_dump()}
    assert text == "Let me check." and [calls[i] for i in sorted(calls)] == WANT


def test_tool_choice_that_forces_a_call_is_refused():
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [], "tool_choice": "required"}
    with pytest.raises(ApiError) as refused:
        read_request(body, chat=True, default_seed=0)
    assert refused.value.status == 400 and refused.value.param == "tool_choice"


def test_stop_strings_with_tools_are_refused():
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
            "stop": "\n"}  # fmt: skip
    with pytest.raises(ApiError) as refused:
        read_request(body, chat=True, default_seed=0)
    assert refused.value.param == "stop"


def test_a_completion_prompt_is_text_or_token_ids():
    assert read_request({"prompt": "hi"}, chat=False, default_seed=0).prompt == {"text": "hi"}
    assert read_request({"prompt": [[5, 6]]}, chat=False, default_seed=0).prompt == {"tokens": [5, 6]}
    for bad in ([], [1.5], [-1], [True], ["a", "b"], {"x": 1}):
        with pytest.raises(ApiError) as refused:
            read_request({"prompt": bad}, chat=False, default_seed=0)
        assert refused.value.param == "prompt"


def test_a_request_past_its_time_limit_leaves_the_batch_without_a_bundle(tiny_checkpoints, tmp_path):
    import queue
    import time

    from kimi_jax.manifest import parse_manifest_dict
    from kimi_jax.run.plan import prepare_run
    from kimi_jax.serve.scheduler import Job, Scheduler

    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])}, "prompt": {"tokens": [7, 9]},
            "generate": {"max_new_tokens": 2000, "ignore_eos": True}, "output": {"dir": str(tmp_path / "b")}}  # fmt: skip
    plan = prepare_run(parse_manifest_dict(data))
    said: list[str] = []
    scheduler = Scheduler(plan, max_batch=2, max_queue=1, keep=5, echo=said.append)
    events: queue.Queue = queue.Queue()
    scheduler.start()
    try:
        job = Job(plan, tmp_path / "late", lambda kind, payload: events.put((kind, payload)), time.monotonic() + 1.0)
        scheduler.submit(job)
        kinds, payload = [], None
        while not kinds or kinds[-1] == "step":
            kind, payload = events.get(timeout=120)
            kinds.append(kind)
    finally:
        scheduler.close()
    assert (kinds[-1], payload) == ("failed", "timeout") and 1 <= kinds.count("step") < 2000
    assert said == [f"late: timeout after {kinds.count('step')} step(s); no bundle written"]
    assert not (tmp_path / "late").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", ["prompts: [{tokens: [5]}, {tokens: [9]}]\n",
                                   "generate: {kv_cache: true, drafts: {method: prompt-lookup, tokens: 2}}\n"])
def test_serve_refuses_a_manifest_of_several_prompts_or_drafts(tmp_path, extra):
    from kimi_jax.errors import ManifestError
    from kimi_jax.serve.command import serve

    path = tmp_path / "m.yaml"
    prompt = "" if extra.startswith("prompts") else "prompt: {tokens: [5]}\n"
    path.write_text(f"version: 1\nmodel: {{synthetic: {{preset: tiny}}, cache_dir: {tmp_path}}}\n{prompt}{extra}"
                    f"output: {{dir: {tmp_path / 'out'}}}\n")
    with pytest.raises(ManifestError, match=r"(prompts|generate.drafts): serve answers one prompt per request"):
        serve(str(path), [], "127.0.0.1", 0, None, None, 1, 1, 1, 10.0)
