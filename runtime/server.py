"""``structkv serve``: an OpenAI-compatible HTTP server over the scheduler (FastAPI on uvicorn).

Routes follow vLLM's OpenAI server: ``POST /v1/chat/completions`` and ``POST /v1/completions``
(``stream: true`` as server-sent events, a usage chunk with ``stream_options.include_usage``,
then ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus).
Every response carries StructKV's own numbers in a ``structkv`` field. Bad requests get OpenAI's
error JSON (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status; the server
keeps serving. A client that disconnects mid-stream cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

# FastAPI reads the route functions' annotations (``request: Request``) by name from this
# module's globals, so these imports cannot be local to build_app.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from structkv.errors import StructKVError
from structkv.runtime.scheduler import Event, SamplingParams, Scheduler

#: Request fields that are accepted but only with their default (anything else is refused).
_ONLY_DEFAULT = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "suffix": None,
    "tools": None,
    "response_format": None,
}
STATS_KEYS = (
    "pivot_layer",
    "propagated_tokens",
    "kv_tokens_per_layer",
    "kv_bytes",
    "kv_bytes_full",
    "compute_fraction",
    "prefill_s",
    "method",
    "backend",
    "compressed",
)


#: Largest request body read (a 128K-token prompt is well under 1 MiB of text): a bigger one is
#: answered 413 before it is buffered, so a client cannot make the server hold gigabytes.
MAX_BODY_BYTES = 16 * 2**20


#: Chat roles OpenAI's API accepts with text content (tool calls are not supported).
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code=None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "internal_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


@dataclass
class Parsed:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


class Metrics:
    """Prometheus series (own registry, so several servers in one process do not collide);
    also the scheduler's observer for time to first token and inter-token latency."""

    def __init__(self, scheduler_counts) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        counts = scheduler_counts
        for name, key, text in (
            ("structkv_requests_running", "running", "requests decoding"),
            ("structkv_requests_waiting", "waiting", "requests queued for KV blocks"),
            ("structkv_kv_blocks_used", "blocks_used", "KV blocks holding tokens"),
            ("structkv_kv_blocks_promised", "blocks_promised", "KV blocks promised to requests"),
        ):
            Gauge(name, text, registry=r).set_function(lambda key=key: counts()[key])
        Gauge("structkv_kv_blocks_free", "KV blocks not holding tokens", registry=r).set_function(
            lambda: counts()["blocks_total"] - counts()["blocks_used"]
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "structkv_time_to_first_token_seconds",
            "arrival to first token",
            buckets=buckets,
            registry=r,
        )
        self.itl = Histogram(
            "structkv_inter_token_latency_seconds",
            "between tokens of a request",
            buckets=buckets,
            registry=r,
        )
        self.saved = Counter(
            "structkv_prefill_tokens_saved",
            "prompt tokens dropped at the pivot (not run through the later layers)",
            registry=r,
        )
        self.prompt_tokens = Counter("structkv_prompt_tokens", "prompt tokens", registry=r)
        self.batch = Histogram(
            "structkv_decode_batch_size",
            "requests sharing one decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.finished_total = Counter(
            "structkv_requests_finished", "requests by finish reason", ["reason"], registry=r
        )

    def prefilled(self, request, seconds: float) -> None:
        self.ttft.observe(seconds)
        stats = request.stats or {}
        n = len(request.prompt_ids)
        self.prompt_tokens.inc(n)
        self.saved.inc(max(0, n - stats.get("propagated_tokens", n)))

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def decoded(self, batch_size: int) -> None:
        self.batch.observe(batch_size)

    def finished(self, reason: str) -> None:
        self.finished_total.labels(reason).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """The scheduler plus what the routes need to turn requests into prompts and back."""

    def __init__(self, backend, name: str) -> None:
        self.backend, self.name = backend, name
        self.scheduler = Scheduler(backend)
        self.metrics = Metrics(self.scheduler.counts)
        self.scheduler.observer = self.metrics
        self.created = int(time.time())

    def parse(self, body: object, chat: bool) -> Parsed:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model", self.name)
        if model != self.name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves "
                f"{self.name!r} (GET /v1/models)",
                "model",
                "model_not_found",
            )
        for key, default in _ONLY_DEFAULT.items():
            if key in body and body[key] != default and not (key == "n" and body[key] is None):
                raise ApiError(
                    400, f"{key}={body[key]!r} is not supported; omit it or use {default!r}", key
                )
        ids = self._chat_ids(body) if chat else self._completion_ids(body)
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = SamplingParams(
            max_tokens=16 if max_tokens is None else max_tokens,
            temperature=1.0 if body.get("temperature") is None else body["temperature"],
            top_p=1.0 if body.get("top_p") is None else body["top_p"],
            seed=body.get("seed"),
            stop=stop if isinstance(stop, tuple) else (stop,),
        )
        try:
            params.check()
        except StructKVError as e:
            raise ApiError(400, str(e)) from None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return Parsed(ids, params, stream, include_usage)

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a string role and content", "messages")
            if m["role"] not in ROLES:
                raise ApiError(
                    400, f"unknown message role {m['role']!r}; use one of {', '.join(ROLES)}",
                    "messages",
                )  # fmt: skip
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                if not all(isinstance(p, str) for p in parts) or not parts:
                    raise ApiError(400, "only text content parts are supported", "messages")
                content = "".join(parts)
            if not isinstance(content, str):
                raise ApiError(400, "message content must be a string", "messages")
            clean.append({"role": m["role"], "content": content})
        tokenizer = self.backend.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template(
                clean, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as e:  # the template's own checks (jinja raise_exception)
            raise ApiError(
                400, f"the chat template refused the messages ({e})", "messages"
            ) from None
        return list(ids)

    def _completion_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(
                400, "prompt must be a non-empty string (one prompt per request)", "prompt"
            )
        return list(self.backend.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _stats(stats: dict | None) -> dict:
    return {k: (stats or {}).get(k) for k in STATS_KEYS}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(service: Service):
    """The FastAPI application (routes close over ``service``)."""

    @asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.stop)

    app = FastAPI(title="StructKV", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.scheduler.counts()}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": service.name,
            "object": "model",
            "created": service.created,
            "owned_by": "structkv",
            "max_model_len": service.backend.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    async def generate(request: Request, chat: bool):
        try:
            body = json.loads(await _read_body(request))
        except ClientDisconnect:  # gone before its body arrived: nothing to run, no one to tell
            return Response(status_code=499)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the body's JSON is nested too deeply") from None
        parsed = service.parse(body, chat)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            rid = service.scheduler.submit(parsed.prompt_ids, parsed.params, emit)
        except StructKVError as e:
            raise ApiError(400, str(e)) from None
        kind = "chatcmpl" if chat else "cmpl"
        head = {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": service.name,
        }
        if parsed.stream:
            return StreamingResponse(
                _stream(service, rid, queue, head, chat, parsed.include_usage),
                media_type="text/event-stream",
            )
        return await _collect(service, rid, queue, head, chat, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        """Whatever escapes a route: a JSON 500 for the client (no traceback), the traceback in
        the server's log, and the server goes on serving."""
        import traceback

        print(f"structkv serve: internal error on {request.url.path}:\n"
              + "".join(traceback.format_exception(exc)), file=sys.stderr, flush=True)  # fmt: skip
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__})").body(), 500)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse(ApiError(404, f"no route {request.url.path}").body(), 404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed here").body(), 405)

    return app


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past :data:`MAX_BODY_BYTES` (by its declared length, or while
    it streams in when it declares none)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body exceeds the limit of {MAX_BODY_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)


async def _hung_up(request: Request) -> None:
    """Returns when the client disconnects. The body is read already, so the next ASGI message
    is ``http.disconnect`` (the way Starlette's StreamingResponse listens for it); polling
    ``request.is_disconnected()`` does not see a hang-up while the server is not reading."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(queue, hung_up: asyncio.Future | None):
    """The request's next event; None when ``hung_up`` completes first (client gone)."""
    getter = asyncio.ensure_future(queue.get())  # one getter: no event is lost
    try:
        waiting = {getter} if hung_up is None else {getter, hung_up}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        return getter.result() if getter in done else None
    finally:
        if not getter.done():
            getter.cancel()


async def _collect(service: Service, rid: int, queue, head: dict, chat: bool, request=None):
    """A non-streaming response: wait for the request to finish (a client that disconnects
    meanwhile cancels it, freeing its KV blocks)."""
    parts, finished = [], False
    hung_up = asyncio.ensure_future(_hung_up(request)) if request is not None else None
    try:
        while True:
            event = await _next_event(queue, hung_up)
            if event is None:  # the client hung up: cancel (finally), answer no one
                return Response(status_code=499)
            if event.kind == "token":
                parts.append(event.text)
            elif event.kind == "error":
                finished = True
                raise ApiError(500, event.message)
            else:
                finished = True
                break
    finally:
        if hung_up is not None:
            hung_up.cancel()
        if not finished:
            service.scheduler.cancel(rid)
    text = "".join(parts)
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": event.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        obj = "text_completion"
    return JSONResponse(
        {
            **head,
            "object": obj,
            "choices": [choice],
            "usage": event.usage,
            "structkv": _stats(event.stats),
        }
    )


async def _stream(service: Service, rid: int, queue, head: dict, chat: bool, include_usage: bool):
    """Server-sent events; closing the connection cancels the request (the ``finally``)."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish=None, role: bool = False) -> dict:
        if chat:
            d = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {**head, "object": obj, "choices": [choice]}

    finished = False
    try:
        if chat:
            yield _sse(chunk(None, role=True))
        while True:
            event = await queue.get()
            if event.kind == "token":
                if event.text:
                    yield _sse(chunk(event.text))
                continue
            finished = True
            if event.kind == "error":
                yield _sse(ApiError(500, event.message).body())
            else:
                yield _sse({**chunk(None, event.finish_reason), "structkv": _stats(event.stats)})
                if include_usage:
                    yield _sse({**head, "object": obj, "choices": [], "usage": event.usage})
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            service.scheduler.cancel(rid)


def make_service(args) -> Service:
    """The backend ``structkv serve`` asked for: an engine, or a model with a method."""
    from structkv.runtime.backends import EngineBackend, TorchBackend

    if args.engine:
        from pathlib import Path

        from structkv.runtime.engine import Engine

        engine = Engine.load(args.engine, kv_cache_mb=args.kv_cache_mb)
        if engine.tokenizer is None:
            raise StructKVError(f"engine {args.engine} has no tokenizer; it cannot serve text")
        name = args.served_model_name or Path(args.engine).resolve().name
        return Service(EngineBackend(engine, name), name)
    from structkv.generate import as_method
    from structkv.knobs import method_knobs
    from structkv.methods import get_method
    from structkv.models import load, torch_dtype

    method = get_method(args.method, **method_knobs(args))  # bad knobs fail before loading
    lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    if lm.tokenizer is None:
        raise StructKVError(f"model {args.model} has no tokenizer; it cannot serve text")
    method = as_method(method, lm.model_id)
    name = args.served_model_name or args.model
    return Service(TorchBackend(lm, method, args.kv_cache_mb), name)


def serve(args) -> int:
    """Load, bind, serve until SIGINT/SIGTERM; streams in flight end with finish_reason
    "abort" and every block is released before the process exits."""
    import uvicorn

    service = make_service(args)
    app = build_app(service)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.scheduler.stop(timeout=0)  # end the streams now, so connections close
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown (exit status -15); this
            # shutdown is complete (streams ended, blocks released), so the process exits 0.
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10
    )
    server = _Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(
                f"StructKV serving {service.name} at http://{args.host}:{args.port}/v1",
                file=sys.stderr,
                flush=True,
            )
        await task

    asyncio.run(run())
    print(
        f"StructKV server stopped; {service.scheduler.counts()['blocks_used']} KV blocks in use",
        file=sys.stderr,
    )
    return 0
