"""``kimi-jax serve`` against real clients: the official ``openai`` package (streamed and not),
concurrent clients, a client that disconnects, refused requests, a full queue and ``kill -9``;
every answer's bundle verifies and its tokens are those of ``kimi-jax run`` of the same prompt."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from kimi_jax.manifest import parse_manifest_dict  # noqa: E402
from kimi_jax.run.plan import prepare_run  # noqa: E402
from kimi_jax.run.runner import execute  # noqa: E402
from kimi_jax.verify.checklist import verify_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"
MODEL = "kimi-k2.5"  # the checkpoint folder's name
HI = [{"role": "user", "content": "Tell me about the lighthouse."}]


def start(tmp: Path, checkpoint: Path, *args: str) -> tuple[subprocess.Popen, int, Path]:
    manifest = tmp / "serve.yaml"
    manifest.write_text(json.dumps({"version": 1, "model": {"checkpoint": str(checkpoint)},
                                    "prompt": {"tokens": [1]}, "generate": {"max_new_tokens": 4},
                                    "output": {"dir": str(tmp / "runs")}}))  # fmt: skip
    key = tmp / "key"
    key.write_text(KEY + "\n")
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kimi_jax.cli", "serve", str(manifest), "--port", "0",
                             "--api-key-file", str(key), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", (tmp / "server.log").read_text())
        if found:
            return proc, int(found.group(1)), tmp / "runs"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError((tmp / "server.log").read_text())


# Kimi K2's way of declaring tools and writing calls and their results, written here for the tests:
# a tool_declare system block with the tools as JSON, calls in the tool-call section markers, a tool's
# result as a message of its own.
KIMI_TOOL_TEMPLATE = """\
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}
{%- if messages[0]['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- for m in messages -%}
{%- if m['role'] == 'tool' -%}<|im_system|>tool<|im_middle|>## Return of {{ m['tool_call_id'] }}
{{ m['content'] }}
{%- else -%}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}
{%- if m.get('tool_calls') -%}<|tool_calls_section_begin|>
{%- for c in m['tool_calls'] -%}<|tool_call_begin|>{{ c['id'] }}<|tool_call_argument_begin|>{{ c['function']['arguments'] }}<|tool_call_end|>
{%- endfor -%}<|tool_calls_section_end|>
{%- endif -%}
{%- endif -%}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
"""


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    """A server on a copy of the tiny checkpoint (its shards linked) whose template knows tools."""
    checkpoint = tmp_path_factory.mktemp("ckpt") / "kimi-k2.5"
    checkpoint.mkdir()
    for f in Path(tiny_checkpoints["kimi-k2.5"]).iterdir():
        if f.name.endswith(".safetensors"):
            (checkpoint / f.name).symlink_to(f)
        else:
            (checkpoint / f.name).write_bytes(f.read_bytes())
    (checkpoint / "chat_template.jinja").write_text(KIMI_TOOL_TEMPLATE)
    proc, port, runs = start(tmp_path_factory.mktemp("serve"), checkpoint)
    yield port, runs, checkpoint
    proc.terminate()  # SIGTERM: a clean stop
    assert proc.wait(timeout=60) == 0 and "stopping (SIGTERM)" in (runs.parent / "server.log").read_text()


def client(port: int, key: str = KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def post(port: int, path: str, body: bytes, key: str = KEY) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(data)


def bundle_tokens(bundle: str) -> list[int]:
    return [s["token"] for s in json.loads((Path(bundle) / "ledger.json").read_text())["steps"]]


def run_alone(tmp: Path, checkpoint: Path, chat: list, max_new_tokens: int, sampling: dict | None) -> list[int]:
    """The tokens of ``kimi-jax run`` of a manifest written here, not by the server."""
    data = {"version": 1, "model": {"checkpoint": str(checkpoint)}, "prompt": {"chat": chat},
            "generate": {"max_new_tokens": max_new_tokens, "sampling": sampling}, "output": {"dir": str(tmp)}}  # fmt: skip
    outcome = execute(prepare_run(parse_manifest_dict(data)), prove=None, echo=lambda *_: None, progress=False)
    return [s.token for s in outcome.steps]


def test_models_and_a_chat_streamed_and_not_give_one_answer_whose_bundle_verifies(server):
    port, runs, _ = server
    c = client(port)
    assert [m.id for m in c.models.list().data] == [MODEL]
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=6,
                                                      seed=11, temperature=0.7, logprobs=True, top_logprobs=3)  # fmt: skip
    whole = raw.parse()
    extension = whole.model_extra["kimi_jax"]
    assert raw.headers["x-kimi-jax-receipt"] == extension["receipt"]
    assert Path(extension["bundle"]).parent == runs.resolve()
    ledger = json.loads((Path(extension["bundle"]) / "ledger.json").read_text())
    assert whole.choices[0].message.content == ledger["text"]["generated_text"]
    assert whole.usage.completion_tokens == len(ledger["steps"]) and whole.usage.prompt_tokens == len(ledger["run"]["prompt"])
    assert ledger["run"]["sampling"]["seed"] == 11 and ledger["non_perturbation"]["identical"]
    content = whole.choices[0].logprobs.content
    assert len(content) == len(ledger["steps"])
    for entry, step in zip(content, ledger["steps"]):
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and entry.logprob <= top[0] + 1e-9
        assert bytes(entry.bytes) == bytes.fromhex(step["token_bytes"])
    report = verify_bundle(extension["bundle"])
    assert report.ok and report.status("non-perturbation") == "OK", report.format()
    assert report.status("note") == "SKIPPED" and "--notes" in report.reason("note")  # left out by default

    chunks = list(c.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, seed=11,
                                            temperature=0.7, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = finals[0].model_extra["kimi_jax"]["bundle"]
    assert streamed != extension["bundle"] and bundle_tokens(streamed) == bundle_tokens(extension["bundle"])
    assert verify_bundle(streamed).ok


def test_tokens_equal_kimi_jax_run_greedy_and_sampled(server, tmp_path):
    port, _, checkpoint = server
    c = client(port)
    for i, sampling in enumerate([None, {"temperature": 0.8, "top_p": 0.9, "seed": 5}]):
        args = {"temperature": 0} if sampling is None else {k: sampling[k] for k in ("temperature", "top_p", "seed")}
        reply = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, **args)
        want = run_alone(tmp_path / str(i), checkpoint, HI, 6, sampling)
        assert bundle_tokens(reply.model_extra["kimi_jax"]["bundle"]) == want
    text = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 3


def test_concurrent_clients_get_the_tokens_of_single_requests(server):
    port, _, _ = server
    prompts = [[{"role": "user", "content": f"Story number {i}, please."}] for i in range(4)]
    # one prompt length and budget: each new shape compiles programs, which would only slow the test
    args = [{"seed": i, "temperature": 0.9, "max_tokens": 6} for i in range(4)]
    single = [bundle_tokens(client(port).chat.completions.create(model=MODEL, messages=p,
                                                                 **a).model_extra["kimi_jax"]["bundle"])
              for p, a in zip(prompts, args)]  # fmt: skip
    together: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        reply = client(port).chat.completions.create(model=MODEL, messages=prompts[i], **args[i])
        together[i] = bundle_tokens(reply.model_extra["kimi_jax"]["bundle"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together.get(i) for i in range(4)] == single


def test_a_client_that_disconnects_mid_stream_is_cancelled_and_leaves_no_bundle(server):
    port, runs, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"messages": HI, "max_tokens": 500, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    bundle = Path(response.getheader("X-Kimi-Jax-Receipt")).parent
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    # the server goes on answering, and the cancelled request never writes its bundle
    after = client(port).chat.completions.create(model=MODEL, messages=HI, max_tokens=6)
    time.sleep(1.0)
    assert after.choices[0].finish_reason == "length"
    assert not bundle.exists() and not [p for p in runs.iterdir() if ".partial-" in p.name]
    log = (runs.parent / "server.log").read_text()
    # the client may leave before the engine took the request from the queue, or after
    assert re.search(rf"{bundle.name}: cancelled (after \d+ step\(s\)|while waiting \(nothing run\)); no bundle written",
                     log), log


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": HI, "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": HI, "logit_bias": {"5": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"messages": HI, "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({"messages": HI, "top_logprobs": 17, "logprobs": True}).encode(), 400, "top_logprobs"),
    (json.dumps({"messages": HI, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({"messages": HI, "max_tokens": 4090}).encode(), 400, None),  # past max_position_embeddings
    (json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode(), 413, None),
])  # fmt: skip
def test_refused_requests_get_the_api_error_shape(server, body, status, param):
    port, _, _ = server
    got, _, reply = post(port, "/v1/chat/completions", body)
    assert got == status and set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    assert reply["error"]["param"] == param
    if status == 400 and param is None and b"4090" in body:
        assert "max_position_embeddings 4096" in reply["error"]["message"]


def test_a_wrong_api_key_is_refused(server):
    port, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(port, "wrong-key-0123456789").models.list()
    got, _, reply = post(port, "/v1/chat/completions", json.dumps({"messages": HI}).encode(), key="")
    assert got == 401 and reply["error"]["type"] == "authentication_error"


def test_serving_beyond_loopback_needs_a_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kimi_jax.cli", "serve", str(tmp_path / "m.yaml"), "--host",
                           "0.0.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --host 0.0.0.0:") and "--api-key-file" in proc.stderr


def test_a_full_queue_gets_429_and_kill_9_leaves_verifiable_bundles(tiny_checkpoints, tmp_path):
    proc, port, runs = start(tmp_path, tiny_checkpoints["kimi-k2.5"], "--max-batch", "1", "--max-queue", "1",
                             "--keep", "2", "--notes")  # fmt: skip
    try:
        done = [post(port, "/v1/completions", json.dumps({"prompt": f"tale {i}", "max_tokens": 2}).encode())[2]
                for i in range(3)]  # fmt: skip
        bundles = [Path(d["kimi_jax"]["bundle"]) for d in done]
        assert not bundles[0].exists() and all(b.exists() for b in bundles[1:])  # retention: the newest 2
        answers: list = []
        slow = json.dumps({"prompt": "a long tale", "max_tokens": 2000}).encode()  # still running when killed

        def ask() -> None:
            try:
                answers.append(post(port, "/v1/completions", slow))
            except ConnectionError:  # the server is killed before it answers
                pass

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        refused = None
        for _ in range(50):
            refused = next((a for a in answers if a[0] == 429), None)
            if refused:
                break
            time.sleep(0.1)
        assert refused and refused[1]["Retry-After"] == "1" and refused[2]["error"]["type"] == "rate_limit_error"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait(30)
    for bundle in bundles[1:]:
        report = verify_bundle(bundle)
        assert report.ok and report.status("note") == "OK", report.format()  # --notes: the note is in the bundle
    names = [p.name for p in runs.iterdir() if not p.name.startswith(".")]
    assert sorted(names) == sorted(b.name for b in bundles[1:])  # nothing half-written under a bundle's name


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}]  # fmt: skip
CALLED = [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "functions.get_weather:0", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21 C"}]  # fmt: skip


def test_tools_pass_through_the_template_and_the_bundle_records_them(server, tmp_path):
    port, _, checkpoint = server
    reply = client(port).chat.completions.create(model=MODEL, messages=CALLED, tools=WEATHER, max_tokens=6,
                                                 temperature=0)  # fmt: skip
    bundle = reply.model_extra["kimi_jax"]["bundle"]
    ledger = json.loads((Path(bundle) / "ledger.json").read_text())
    prompt = ledger["text"]["prompt_text"]
    assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>[{") and '"get_weather"' in prompt
    assert '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}' in prompt
    assert "## Return of functions.get_weather:0\nsunny, 21 C<|im_end|>" in prompt
    assert ledger["run"]["prompt_input"]["tools"] == WEATHER
    report = verify_bundle(bundle)  # verify renders the recorded chat with the recorded tools again
    assert report.ok and report.status("text") == "OK", report.format()
