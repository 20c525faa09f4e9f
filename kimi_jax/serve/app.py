"""``kimi-jax serve``: the OpenAI HTTP API on aiohttp, in front of the engine thread
(:mod:`kimi_jax.serve.scheduler`).

Each request is read (:mod:`kimi_jax.serve.api`), planned as a run of its own manifest on the
server's opened checkpoint (:func:`~kimi_jax.run.plan.replan`, on one planning thread: chat
templates render in the tokenizer's worker process), queued, and answered from its steps as they
come. A client that goes away cancels its request (aiohttp cancels the handler); the engine drops
its row at the next pass boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from kimi_jax.errors import KimiJaxError
from kimi_jax.manifest import Manifest, parse_manifest_dict
from kimi_jax.run.plan import RunPlan, replan
from kimi_jax.serve.api import MAX_BODY_BYTES, ApiError, parse_body, read_request
from kimi_jax.serve.bundles import new_name
from kimi_jax.serve.replies import Reply, chunk, completion, usage_chunk
from kimi_jax.serve.scheduler import Job, QueueFull, Scheduler

RECEIPT_HEADER = "X-Kimi-Jax-Receipt"
RETRY_AFTER_S = 1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    def __init__(self, plan: RunPlan, runs: Path, scheduler: Scheduler, model: str, api_key: str | None,
                 time_limit_s: float):  # fmt: skip
        self.plan, self.runs, self.scheduler, self.model = plan, runs, scheduler, model
        self.echo = scheduler.echo
        self.api_key, self.time_limit_s = api_key, time_limit_s
        self.planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-jax-plan")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", lambda r: self.complete(r, chat=True))
        app.router.add_post("/v1/completions", lambda r: self.complete(r, chat=False))
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:  # aiohttp's own refusals (404, 405, 413) in the API's shape
            if e.status < 400:
                raise
            kind = "not_found_error" if e.status == 404 else "invalid_request_error"
            message = e.reason if e.status != 413 else f"the request body exceeds {MAX_BODY_BYTES:,} bytes"
            return web.json_response(ApiError(e.status, message, kind=kind).body(), status=e.status)
        except Exception as e:  # noqa: BLE001 - a bug of ours: the client gets the API's shape, the log one line
            self.echo(f"internal error answering {request.path}: {type(e).__name__}: {str(e)[:200]}")
            return web.json_response(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body(),
                                     status=500)  # fmt: skip

    @web.middleware
    async def _auth(self, request, handler):
        if self.api_key is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", kind="authentication_error")
        return await handler(request)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                              "owned_by": "kimi-jax"}]})  # fmt: skip

    async def complete(self, request: web.Request, chat: bool):
        body = parse_body(await request.read())
        if body.get("model") not in (None, self.model):
            raise ApiError(404, f"model {str(body['model'])[:100]!r} is not served here; this server serves "
                                f"{self.model!r}", "model", kind="not_found_error")  # fmt: skip
        req = read_request(body, chat, secrets.randbelow(2**63))
        name = new_name()
        bundle = self.runs / name
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(self.planner, self._plan, req, bundle)
        events: asyncio.Queue = asyncio.Queue()
        job = Job(plan, bundle, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
                  time.monotonic() + self.time_limit_s)  # fmt: skip
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, "the server's queue is full; retry later", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{name}"
        reply = Reply(req, plan.tokenizer, plan.decoding.stop_strings, len(plan.prompt))
        headers = {RECEIPT_HEADER: str(bundle / "receipt.json")}
        try:
            if req.stream:
                return await self._stream(request, events, reply, rid, headers)
            return await self._whole(events, reply, rid, headers)
        finally:
            job.cancelled.set()  # a no-op once the request ended; else (disconnect, error) the engine drops it

    def _plan(self, req, bundle: Path) -> RunPlan:
        """The request's manifest: the server's, with the request's prompt, budget, sampling and stop."""
        data = self.plan.manifest.resolved_dict()
        data["prompt"] = req.prompt
        generate = data["generate"]
        generate.update(sampling=req.sampling, stop=req.stop)
        if req.max_tokens is not None:
            generate["max_new_tokens"] = req.max_tokens
        data.update(anchor=None, output={**data["output"], "dir": str(bundle)})
        try:
            manifest: Manifest = parse_manifest_dict(data, source="request")
            return replan(self.plan, manifest)
        except KimiJaxError as e:
            raise ApiError(400, str(e).replace("request: ", "")) from None

    async def _next(self, events: asyncio.Queue, reply: Reply):
        kind, payload = await events.get()
        if kind == "failed":
            if payload == "timeout":
                raise ApiError(408, f"the request ran past the server's time limit of {self.time_limit_s:g} s; "
                                    "no bundle was written", kind="timeout_error")  # fmt: skip
            raise ApiError(500, str(payload), kind="server_error")
        return kind, payload

    def _extension(self, reply: Reply, done: dict) -> dict:
        r = reply.request
        return {"bundle": done["bundle"], "receipt": done["receipt"], "stopped": done["stopped"],
                "seed": r.sampling["seed"] if r.sampling else None,
                "proof": "step 0 (the prompt's) run bare and instrumented: identical"}  # fmt: skip

    async def _whole(self, events, reply: Reply, rid: str, headers: dict):
        while True:
            kind, payload = await self._next(events, reply)
            if kind == "step":
                reply.add(payload)
            else:
                reply.close()
                body = completion(reply, rid, self.model, reply.finish_reason(payload["stopped"]),
                                  self._extension(reply, payload))  # fmt: skip
                return web.json_response(body, headers=headers)

    async def _stream(self, request, events, reply: Reply, rid: str, headers: dict):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **headers})  # fmt: skip
        await response.prepare(request)

        async def send(obj) -> None:
            await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        await send(chunk(reply, rid, self.model, "" if reply.request.chat else None, first=True))
        try:
            while True:
                kind, payload = await self._next(events, reply)
                if kind == "step":
                    before, called = len(reply.logprobs), len(reply.calls)
                    text, calls = reply.add(payload)
                    if text or calls or reply.request.logprobs:
                        await send(chunk(reply, rid, self.model, text, reply.logprobs[before:],
                                         calls=list(enumerate(calls, called))))  # fmt: skip
                    continue
                called = len(reply.calls)
                rest, calls = reply.close()
                if rest or calls:
                    await send(chunk(reply, rid, self.model, rest, calls=list(enumerate(calls, called))))
                await send(chunk(reply, rid, self.model, None, finish=reply.finish_reason(payload["stopped"]),
                                 extension=self._extension(reply, payload)))  # fmt: skip
                if reply.request.include_usage:
                    await send(usage_chunk(reply, rid, self.model))
                break
        except ApiError as e:  # the status line is sent already: the error is the stream's last event
            await send(e.body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def serve_forever(server: Server, host: str, port: int, announce) -> None:
    """Bind ``host:port`` (0: any free port), announce the address, serve until cancelled."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KimiJaxError(f"--host {host} --port {port}: cannot bind: {e.strerror or e}") from None
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    bound = sock.getsockname()
    announce(f"serving {server.model} on http://{host if ':' not in host else f'[{host}]'}:{bound[1]}/v1 "
             f"(bundles in {server.runs})")  # fmt: skip
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)  # a service manager's stop: clean up
    try:
        await stop.wait()
        announce("stopping (SIGTERM)")
    finally:
        await runner.cleanup()
