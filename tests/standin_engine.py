"""A stand-in for a vLLM OpenAI server, for fault injection only (never used by the e2e suite).

Started by the gateway exactly as it starts vLLM (``python -m tests.standin_engine --model PATH
--served-model-name NAME --port P ...``; set ``engine_module: tests.standin_engine`` in the config).
Its behaviour comes from the model path, ``standin:MODE[,MODE...]``:

- ``ok``                  answer like vLLM (chunks of one word, ``[DONE]``, usage chunk on request)
- ``slow-start=S``        become healthy after S seconds
- ``hang-start``          never become healthy
- ``fail-start``          exit with status 3 at once, after printing an error
- ``fail-after=S``        never become healthy, exit with status 3 after S seconds
- ``crash-mid-stream``    send two chunks, then exit hard (``os._exit``)
- ``crash-mid-event``     send two chunks and half of a third, then exit hard
- ``ignore-sigterm``      ignore SIGTERM (only SIGKILL ends it)
- ``delay=S``             seconds between chunks (and before a non-streamed answer: S × max_tokens)
- ``context=N``           the ``max_model_len`` its ``GET /v1/models`` reports (default 4096)
- ``word=N``              N more characters in each word (tokens of many bytes: a stream that fills a
                          client's socket buffers soon)
- ``crlf``                end each streamed line with ``\\r\\n``, as the SSE standard allows (a server
                          that is not vLLM, on another host)
- ``fork-core``           start a child in its own process group that ignores SIGTERM, as vLLM's
                          ``EngineCore`` lives beside its API server (its pid: ``core_pid``)
- ``fail-wake``, ``slow-wake=S``, ``sleep-unsupported``: vLLM's sleep mode, served with
                          ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` (``/sleep``,
                          ``/wake_up``, ``/is_sleeping``, ``/collective_rpc``): see
                          ``tests/standin_sleep.py``

It writes ``$STANDIN_DIR/<served name>.json`` (and ``<served name>@<port or socket id>.json``, one
per replica) after every change: pid, port (or socket id, with ``--uds``), the ``address`` it
listens on (``unix:/path.sock`` or ``http://host:port``), argv, counters (``started``,
``completed``, ``aborted``, ``running``), the ``last`` request body and the ``prompts`` of the last 50 completions in the
order they arrived, so tests can see what reached the engine. It answers
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and, minimally, Anthropic's
``/v1/messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from tests.standin_sleep import SleepMode, Ticket


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--uds")  # a Unix socket path, as vLLM's --uds (host and port are ignored then)
    return p.parse_known_args(argv)


def listen_id(args: argparse.Namespace) -> str:
    """What names this engine in its stats files: its port, or its socket's id (tests.gateway.engine_id)."""
    return Path(args.uds).stem if args.uds else str(args.port)


class Standin:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.name = args.served_model_name
        self.modes = dict((m.split("=", 1) + [""])[:2] for m in args.model.split(":", 1)[1].split(","))
        self.delay = float(self.modes.get("delay") or 0.01)
        self.healthy_at = time.monotonic() + float(self.modes.get("slow-start") or 0)
        self.max_model_len = int(self.modes.get("context") or 4096)
        self.stats = {"pid": os.getpid(), "port": listen_id(args), "argv": argv,
                      "address": f"unix:{args.uds}" if args.uds else f"http://{args.host}:{args.port}",
                      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": 0,
                      "completed": 0, "aborted": 0, "running": 0}
        folder = Path(os.environ.get("STANDIN_DIR", "."))
        safe = self.name.replace("/", "_")
        self.outs = (folder / f"{safe}.json", folder / f"{safe}@{listen_id(args)}.json")
        self.sleep = SleepMode(self, argv)
        self.save()

    def save(self) -> None:
        for out in self.outs:
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # engines can share a name
            tmp.write_text(json.dumps(self.stats))
            os.replace(tmp, out)

    def count(self, key: str, delta: int = 1) -> None:
        self.stats[key] += delta
        self.save()

    async def health(self, request: web.Request) -> web.Response:
        if "hang-start" in self.modes or time.monotonic() < self.healthy_at:
            return web.Response(status=503)
        return web.Response(status=200)

    def words(self, body: dict) -> list[str]:
        n = int(body.get("max_tokens") or 8)
        if not self.sleep.weights_valid():  # woken from a level-2 sleep without a reload
            return [" garbage"] * n
        pad = "x" * int(self.modes.get("word") or 0)
        return [f" w{i}{pad}" for i in range(n)]

    def chunk(self, body: dict, obj: str, **fields) -> bytes:
        data = {"id": "standin-1", "object": obj, "created": 1, "model": self.name, **fields}
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + self.blank_line

    @property
    def blank_line(self) -> bytes:
        """What ends a streamed event: vLLM's ``\\n\\n``, or ``\\r\\n\\r\\n`` (``crlf``)."""
        return b"\r\n\r\n" if "crlf" in self.modes else b"\n\n"

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._generate(request)
        except (ValueError, TypeError, AttributeError) as exc:  # odd input: a 400, as vLLM answers
            return web.json_response({"error": {"message": f"bad request: {exc}", "type":
                                                "BadRequestError", "param": None, "code": 400}},
                                     status=400)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.stats["last"] = body
        self.stats["prompts"] = (self.stats.get("prompts") or [])[-49:] + [body.get("prompt")]
        if body.get("model") != self.name:
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not "
                                                "exist.", "type": "NotFoundError", "param": "model",
                                                "code": 404}}, status=404)
        if int(body.get("max_tokens") or 8) > 1000:
            return web.json_response({"error": {"message": "max_tokens too large", "type":
                                                "BadRequestError", "param": "max_tokens", "code": 400}},
                                     status=400)
        chat = request.path.endswith("chat/completions")
        obj = "chat.completion" if chat else "text_completion"
        ticket = Ticket() if self.sleep.enabled else None
        stream = bool(body.get("stream"))
        # vLLM sends a stream's 200 and headers at once, even while it sleeps
        resp = await self.open_stream(request) if stream and ticket is not None else None
        admitted = False
        try:
            admitted = ticket is None or await self.sleep.admit(ticket)
            if admitted:
                self.count("started")
                self.count("running")
            words = self.words(body)  # after the wake: computed with the weights then loaded
            usage = {"prompt_tokens": 3, "completion_tokens": len(words),
                     "total_tokens": 3 + len(words)}
            if not stream:
                return await self.answer(ticket, admitted, chat, obj, words, usage)
            resp = resp or await self.open_stream(request)
            return await self.stream(resp, body, ticket, admitted, chat, obj, words, usage)
        except (asyncio.CancelledError, ConnectionResetError):
            self.count("aborted")
            raise
        finally:
            if admitted:
                self.count("running", -1)
            if ticket is not None:
                self.sleep.release(ticket, admitted)

    async def open_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        return resp

    async def answer(self, ticket: Ticket | None, admitted: bool, chat: bool, obj: str,
                     words: list[str], usage: dict) -> web.Response:
        """A non-streamed answer; a sleep with mode=abort makes it a 200 with the partial text."""
        done = len(words)
        if ticket is None:
            await asyncio.sleep(self.delay * len(words))
        else:
            done = 0
            while admitted and done < len(words) and not await self.sleep.tick(ticket, self.delay):
                done += 1
        reason = "length" if done == len(words) else "abort"
        text = "".join(words[:done])
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "finish_reason": reason})
        if reason != "abort":
            self.count("completed")
        return web.json_response({"id": "standin-1", "object": obj, "created": 1,
                                  "model": self.name, "choices": [choice],
                                  "usage": dict(usage, completion_tokens=done, total_tokens=3 + done)})

    async def stream(self, resp: web.StreamResponse, body: dict, ticket: Ticket | None,
                     admitted: bool, chat: bool, obj: str, words: list[str],
                     usage: dict) -> web.StreamResponse:
        kind = obj + (".chunk" if chat else "")
        sent, aborted = 0, not admitted
        for i, word in enumerate(words if admitted else []):
            if i == 2 and "crash-mid-stream" in self.modes:
                os._exit(9)
            if i == 2 and "crash-mid-event" in self.modes:
                await resp.write(b'data: {"id":"standin-1","choi')
                await asyncio.sleep(0.05)
                os._exit(9)
            last = i == len(words) - 1
            delta = {"content": word} if chat else None
            choice = ({"index": 0, "delta": delta, "finish_reason": "length" if last else None}
                      if chat else {"index": 0, "text": word,
                                    "finish_reason": "length" if last else None})
            await resp.write(self.chunk(body, kind, choices=[choice]))
            sent += 1
            if await self.sleep.tick(ticket, self.delay):
                aborted = not last
                break
        if aborted:  # how vLLM ends a stream a sleep (mode=abort) cut short
            choice = {"index": 0, "finish_reason": "abort", "stop_reason": None,
                      **({"delta": {}} if chat else {"text": ""})}
            await resp.write(self.chunk(body, kind, choices=[choice]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(self.chunk(body, kind, choices=[], usage=dict(
                usage, completion_tokens=sent, total_tokens=3 + sent)))
        await resp.write(b"data: [DONE]" + self.blank_line)
        if not aborted:
            self.count("completed")
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        labels = f'engine="0",model_name="{self.name}"'
        return web.Response(text="# HELP vllm:num_requests_running Requests running.\n"
                                 "# TYPE vllm:num_requests_running gauge\n"
                                 f"vllm:num_requests_running{{{labels}}} {self.stats['running']}.0\n"
                                 + self.sleep.metrics(labels) +
                                 "# TYPE python_info gauge\npython_info 1.0\n")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API, as far as the tests need it: one text block of words."""
        body = await request.json()
        self.stats["last"] = body
        await self.sleep.wait_awake()
        words = self.words(body)
        if not body.get("stream"):
            return web.json_response({"id": "msg-1", "type": "message", "role": "assistant",
                                      "model": self.name, "stop_reason": "max_tokens",
                                      "content": [{"type": "text", "text": "".join(words)}],
                                      "usage": {"input_tokens": 3, "output_tokens": len(words)}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def event(name: str, data: dict) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        await event("message_start", {"type": "message_start", "message": {
            "id": "msg-1", "type": "message", "role": "assistant", "model": self.name,
            "content": [], "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 0}}})
        await event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        for word in words:
            await event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": word}})
            await asyncio.sleep(self.delay)
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                      "usage": {"output_tokens": len(words)}})
        await event("message_stop", {"type": "message_stop"})
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "max_model_len": self.max_model_len}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("input"), (str, list)):
            return web.json_response({"error": {"message": "bad input", "type": "BadRequestError",
                                                "param": "input", "code": 400}}, status=400)
        await self.sleep.wait_awake()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"index": i, "object": "embedding", "embedding": [0.1] * 8} for i in range(len(inputs))]
        return web.json_response({"object": "list", "model": self.name, "data": data,
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})


def main(argv: list[str]) -> None:
    args, _ = parse(argv)
    standin = Standin(args, argv)
    standin.sleep.refuse_start(argv)
    if "fail-start" in standin.modes:
        print("standin: failing at start as asked (CUDA out of memory, simulated)", flush=True)
        sys.exit(3)
    if "ignore-sigterm" in standin.modes:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "fork-core" in standin.modes:
        import subprocess
        core = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1e6)"])
        standin.stats["core_pid"] = core.pid
        standin.save()
    app = web.Application()
    app.router.add_get("/health", standin.health)
    app.router.add_get("/metrics", standin.metrics)
    app.router.add_get("/v1/models", standin.models)
    app.router.add_post("/v1/chat/completions", standin.generate)
    app.router.add_post("/v1/completions", standin.generate)
    app.router.add_post("/v1/embeddings", standin.embeddings)
    app.router.add_post("/v1/messages", standin.messages)
    standin.sleep.attach(app)
    if "fail-after" in standin.modes:
        standin.healthy_at = float("inf")

        async def fail_later(app: web.Application) -> None:
            async def later() -> None:
                await asyncio.sleep(float(standin.modes["fail-after"]))
                print("standin: failing after the delay asked for", flush=True)
                os._exit(3)
            app["fail"] = asyncio.ensure_future(later())
        app.on_startup.append(fail_later)
    where = {"path": args.uds} if args.uds else {"host": args.host, "port": args.port}
    print(f"standin: {standin.name} listening on {args.uds or f'{args.host}:{args.port}'}", flush=True)
    web.run_app(app, **where, print=None, handler_cancellation=True,
                handle_signals="ignore-sigterm" not in standin.modes)


if __name__ == "__main__":
    main(sys.argv[1:])
