"""One FastAPI app, two faces: an OpenAI-compatible API and a web page.

    POST /v1/chat/completions   chat, streaming or not (the `openai` client works unchanged)
    POST /v1/completions        text or token ids in, text out: several prompts, echo, prompt scoring
                                (for base models and evaluation harnesses: lm-evaluation-harness's local-completions)
    GET  /tokenizer_info, POST /tokenize, /detokenize   the tokenizer, as vLLM offers it
    GET  /v1/models, /health (and HEAD), /config, /stats, /metrics (Prometheus), and / (the chat page)

Requests share the engine's continuous batching through an EngineWorker (a
thread the app starts, or the caller's own: chat_service steps the engine in
its main thread). A stream sends what arrived since its last chunk, at most
one chunk per `stream_interval`, and all streams together at most
`stream_chunk_rate` chunks a second (so the cost of chunks stays a fixed share of the CPU however
many clients stream). Every client mistake gets a 4xx with OpenAI's error object, every
server-side failure ends that request alone (an error object, or an error
event and [DONE] in a stream), a client that leaves cancels its work, and
the server keeps serving whatever it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api_metrics import CountResponses, ServerMetrics, TokenClock
from serving.api_request import ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, read_json
from serving.api_response import ChatDialect, Dialect, TextDialect, sse
from serving.prompts import Prompt, check_ids, read_prompt, tokenizer_info
from nanochat.conversation import gather_system, parts_from_shown
from nanochat.curves import curve_file, list_curves
from nanochat.engine import Engine, EngineWorker, Request as EngineRequest
from serving.error_pacing import ErrorPacer
from nanochat.report import report_dir
from nanochat.sampling import SamplingParams

UI_PAGE = Path(__file__).parent / "ui" / "index.html"
ENGINE_PATIENCE = 10.0  # seconds past a request's deadline before the server stops waiting for a stuck engine
log = logging.getLogger("nanochat.server")


@dataclass
class ServerSettings:
    model_id: str = "nanochat"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_messages: int = 64
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_queue: int = 32
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int | None = None  # None: until the model stops or the context is full, as OpenAI does
    request_timeout: float = 600.0  # seconds from arrival to the last token
    body_timeout: float = 30.0  # seconds for a request body to arrive
    # seconds: a stream sends at most one chunk per interval, its tokens since the last; 50 chunks/s reads as
    # smooth as one per token, and cost a quarter of the client's CPU (bench/README "Serving", Xeon-3)
    stream_interval: float = 0.02
    # chunks a second, all streams together: each chunk costs the server and its client about 0.6 ms of CPU
    # (2-core Xeon, bench/README "Serving"), so 8 streams at 50 chunks/s each spent a quarter of the machine on
    # chunks; at 100, 8 streams get a chunk per 80 ms each (12 a second), still smooth to read. 0: no limit
    stream_chunk_rate: float = 100.0

    @property
    def max_body_bytes(self) -> int:
        # JSON may escape every character as \uXXXX (6 bytes); the rest is room for fields and structure
        return 6 * self.max_total_chars + 64 * 1024


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, param, code, kind).body(), status_code=status)


# ---------------------------------------------------------------- the app


class ChatService:
    """The state behind the routes: engine, settings, counters."""

    def __init__(self, engine: Engine, settings: ServerSettings, model_info: dict):
        self.engine, self.settings, self.model_info = engine, settings, model_info
        self.metrics = ServerMetrics(engine)
        self.pacer = ErrorPacer()
        self.started = time.time()
        self.served = 0
        self.in_flight = 0
        self.streams = 0
        self.worker: EngineWorker | None = None
        self.watchers: set[asyncio.Task] = set()

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key and not secrets.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    def chunk_interval(self) -> float:
        """Seconds between one stream's chunks now: its own interval, or its share of the chunk rate."""
        s = self.settings
        return max(s.stream_interval, self.streams / s.stream_chunk_rate if s.stream_chunk_rate else 0.0)

    def unavailable(self) -> str | None:
        """Why no request can be served now, or None."""
        if self.engine.closed is not None:
            return self.engine.closed.message
        if self.worker is None or not self.worker.is_alive():
            return (self.worker and self.worker.failure) or "the engine is not running"
        return None

    def conversation(self, body: ChatRequest) -> list[dict]:
        s, msgs = self.settings, body.messages
        if not msgs:
            raise ApiError(400, "messages must not be empty", "messages")
        if len(msgs) > s.max_messages:
            raise ApiError(400, f"too many messages: {len(msgs)} (limit {s.max_messages})", "messages")
        total = 0
        for i, m in enumerate(msgs):
            text = m.text()
            total += len(text)
            if len(text) > s.max_message_chars:
                raise ApiError(400, f"messages[{i}] has {len(text)} characters (limit {s.max_message_chars})", f"messages[{i}].content")
            if m.role == "user" and not text.strip():
                raise ApiError(400, f"messages[{i}] is empty", f"messages[{i}].content")
        if total > s.max_total_chars:
            raise ApiError(400, f"the conversation has {total} characters (limit {s.max_total_chars})", "messages")
        turns = [m for m in msgs if m.role not in ("system", "developer")]
        for i, m in enumerate(turns):
            if m.role != ("user" if i % 2 == 0 else "assistant"):
                raise ApiError(400, "apart from system messages, turns must alternate user/assistant, starting and ending with user", "messages")
        if not turns or turns[-1].role != "user":
            raise ApiError(400, "the last message must be from the user", "messages")
        # the developer role is what current OpenAI clients send in place of system
        return gather_system([{"role": "system" if m.role == "developer" else m.role,
                               "content": parts_from_shown(m.text()) if m.role == "assistant" else m.text()} for m in msgs])

    def prompts_for(self, body: ChatRequest | CompletionRequest) -> list[Prompt]:
        tokenizer = self.engine.tokenizer
        if isinstance(body, ChatRequest):
            return [Prompt(tokenizer.render_for_completion({"messages": self.conversation(body)}), 0, "")]
        texts = [p for p in body.prompts() if isinstance(p, str)]
        chars = sum(map(len, texts))
        if chars > self.settings.max_total_chars:
            raise ApiError(400, f"the prompt has {chars} characters (limit {self.settings.max_total_chars})", "prompt")
        many = isinstance(body.prompt, list) and not isinstance(body.prompt[0], int)
        return [read_prompt(tokenizer, prompt, body.add_special_tokens, f"prompt[{i}]" if many else "prompt")
                for i, prompt in enumerate(body.prompts())]

    def sampling(self, body: ChatRequest | CompletionRequest, prompts: list[Prompt]) -> SamplingParams:
        s, param, asked = self.settings, *body.token_limit()
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i].tokens))
        prompt_len = len(prompts[longest].tokens)
        room = self.engine.max_len - prompt_len
        if room < (1 if asked != 0 else 0):  # a prompt only scored may fill the context
            where = "messages" if isinstance(body, ChatRequest) else f"prompt[{longest}]" if len(prompts) > 1 else "prompt"
            raise ApiError(400, f"{where} is {prompt_len} tokens; the model's context is {self.engine.max_len}", where, "context_length_exceeded")
        if asked is not None and asked > room:
            raise ApiError(400, f"{param}={asked} does not fit: the prompt uses {prompt_len} of {self.engine.max_len} tokens, "
                                f"so at most {room} can follow", param, "context_length_exceeded")
        if body.n > self.engine.cache.slots:
            raise ApiError(400, f"n must be at most {self.engine.cache.slots} (the server's --max-batch)", "n")
        return SamplingParams(
            temperature=s.temperature if body.temperature is None else body.temperature,
            top_k=s.top_k if body.top_k is None else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=asked if asked is not None else min(s.max_tokens or room, room),
            seed=body.seed, stop=tuple(body.stop or ()), logprobs=body.top_logprobs_wanted(),
            prompt_logprobs=body.prompt_logprobs_wanted(),
        )

    def check_model(self, body) -> None:
        if body.model not in (None, "", self.settings.model_id):
            raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{self.settings.model_id}'", "model", "model_not_found")

    def start(self, body: ChatRequest | CompletionRequest, prompts: list[Prompt]) -> EngineRequest:
        params = self.sampling(body, prompts)
        if self.engine.queue_depth() >= self.settings.max_queue:
            raise ApiError(429, "the server is busy (request queue full); retry shortly", code="queue_full", kind="rate_limit_error")
        reason = self.unavailable()
        if reason is not None:
            raise ApiError(503, reason, kind="server_error")
        try:
            return self.engine.submit_batch([p.tokens for p in prompts], params, body.n, timeout=self.settings.request_timeout)
        except RuntimeError as exc:  # closed between the check and the submit
            raise ApiError(503, str(exc), kind="server_error") from None

    def cancel_on_disconnect(self, http_request: Request, engine_request: EngineRequest) -> asyncio.Task:
        """Watch the client: when it goes away, its request is cancelled (queued, running, or holding text back).

        The task is held here until it ends: a streaming response that stops early leaves its generator
        unfinished, and a task only that generator refers to could be collected before it fired."""

        async def watch():
            while (await http_request.receive())["type"] != "http.disconnect":
                pass
            engine_request.cancel()

        task = asyncio.create_task(watch())
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)
        return task

    def page_config(self) -> dict:
        s = self.settings
        return {"model": s.model_id, "temperature": s.temperature, "top_k": s.top_k, "max_tokens": s.max_tokens,
                "context_length": self.engine.max_len, "api_key_required": bool(s.api_key)}

    def stats(self) -> dict:
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "requests_served": self.served,
            "requests_in_flight": self.in_flight,
            "streams_sending": self.streams,  # the streams sharing --stream-chunk-rate now
            "queue_depth": self.engine.queue_depth(),
            "slots_in_use": self.engine.slots_in_use(),
            "tokens_generated": self.engine.tokens_generated,
            "recent_tokens_per_second": round(self.engine.recent_rate(), 1),
            "model": self.model_info,
        }


def create_app(engine: Engine, settings: ServerSettings, model_info: dict, worker: EngineWorker | None = None) -> FastAPI:
    """The app; when it starts, an EngineWorker thread starts stepping `engine`, unless the caller
    brings a `worker` it runs itself (chat_service steps the engine in its main thread). Either stops
    with the app."""
    service = ChatService(engine, settings, model_info)

    @asynccontextmanager
    async def lifespan(_app):
        service.worker = worker or EngineWorker(engine)
        if worker is None:
            service.worker.start()
        yield
        engine.close(503, "the server is shutting down")
        service.worker.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.router.redirect_slashes = False  # a trailing slash is answered (below), not redirected
    app.state.service = service
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    install_error_handlers(app)
    add_completion_routes(app, service)
    add_tokenizer_routes(app, service)
    add_info_routes(app, service)
    app.add_middleware(CountResponses, metrics=service.metrics)
    app.add_middleware(StripTrailingSlash)  # added last, so it runs first: routes and metrics see the bare path
    return app


def add_completion_routes(app: FastAPI, service: ChatService) -> None:
    """The OpenAI-compatible endpoints."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(service, request, ChatRequest, ChatDialect)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(service, request, CompletionRequest, TextDialect)


def add_tokenizer_routes(app: FastAPI, service: ChatService) -> None:
    """The tokenizer as vLLM serves it, so clients count tokens without a copy of it
    (lm-evaluation-harness's tokenizer_backend=remote)."""
    tokenizer, settings = service.engine.tokenizer, service.settings

    async def body_of(request: Request, schema):
        service.check_auth(request)
        body = schema.model_validate(await read_json(request, settings.max_body_bytes, settings.body_timeout))
        service.check_model(body)
        return body

    @app.get("/tokenizer_info")
    async def info(request: Request):
        service.check_auth(request)
        return tokenizer_info(tokenizer, service.engine.max_len)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request, TokenizeRequest)
        if len(body.prompt) > settings.max_total_chars:
            raise ApiError(400, f"the prompt has {len(body.prompt)} characters (limit {settings.max_total_chars})", "prompt")
        tokens = read_prompt(tokenizer, body.prompt, body.add_special_tokens, "prompt").tokens if body.prompt or body.add_special_tokens else []
        return {"count": len(tokens), "max_model_len": service.engine.max_len, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request, DetokenizeRequest)
        check_ids(tokenizer, body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}


def add_info_routes(app: FastAPI, service: ChatService) -> None:
    """Health, the page and its configuration, the model list, statistics, metrics and training curves."""
    engine, settings, model_info = service.engine, service.settings, service.model_info

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        reason = service.unavailable()
        if reason is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": reason}, status_code=503)

    @app.get("/config")
    async def config():
        """What a page needs before its first request: the server's sampling defaults and the context."""
        return service.page_config()

    @app.get("/stats")
    async def stats(request: Request):
        service.check_auth(request)
        return service.stats()

    @app.get("/metrics")
    async def metrics(request: Request):
        service.check_auth(request)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_auth(request)
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": int(service.started),
                                            "owned_by": "nanochat", "context_length": engine.max_len, "metadata": model_info}]}

    @app.get("/report/curves")
    async def curves(request: Request):
        """The training curves the report folder holds (PNG names, newest first), for the page's model info."""
        service.check_auth(request)
        return {"curves": list_curves(report_dir())}

    @app.get("/report/curves/{name}")
    async def curve(request: Request, name: str):
        service.check_auth(request)
        path = curve_file(report_dir(), name)  # only curves-<stage>.png files directly in the folder
        if path is None:
            raise ApiError(404, f"no training curve {name!r} (GET /report/curves lists them)", param="name")
        return FileResponse(path, media_type="image/png")

    @app.get("/")
    async def page():
        return FileResponse(UI_PAGE, media_type="text/html")


class StripTrailingSlash:
    """ASGI middleware: /v1/chat/completions/ is /v1/chat/completions (clients given a base URL ending in / send it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            scope = {**scope, "path": scope["path"].rstrip("/") or "/"}
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- answering


async def answer(service: ChatService, request: Request, schema, dialect_class) -> Response:
    service.check_auth(request)
    body = schema.model_validate(await read_json(request, service.settings.max_body_bytes, service.settings.body_timeout))
    service.check_model(body)
    prompts = service.prompts_for(body)
    engine_request = service.start(body, prompts)
    watcher = service.cancel_on_disconnect(request, engine_request)
    dialect = dialect_class(service.settings.model_id, service.engine.tokenizer)
    echo = Echo(prompts, body.n, on=getattr(body, "echo", False))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(service, dialect, engine_request, watcher, echo, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(service, dialect, engine_request, watcher, echo)


class Echo:
    """What `echo` puts before each choice, once: its prompt as the client sent it and, with logprobs,
    the log-probabilities of the client's tokens (the engine's event for them, less any <|bos|> the
    server added). Off, it adds nothing."""

    def __init__(self, prompts: list[Prompt], n: int, on: bool):
        self.prompts, self.n, self.on = prompts, n, on
        self.done: set[int] = set()

    def first(self, index: int, events: list) -> tuple[str, list]:
        """The text and logprob entries to put before the choice's `events`; nothing after the first time."""
        if not self.on or index in self.done:
            return "", []
        self.done.add(index)
        prompt = self.prompts[index // self.n]
        scored = next((e.prompt_logprobs for e in events if e.index == index and e.prompt_logprobs is not None), [])
        return prompt.shown, scored[prompt.added :]


@asynccontextmanager
async def serving(service: ChatService, engine_request: EngineRequest, watcher: asyncio.Task):
    """Count the request in flight and, however it ends, free its slots and stop watching its client."""
    service.in_flight += 1
    try:
        yield
    except asyncio.TimeoutError:
        engine_request.fail(504, "the engine did not answer in time")
    finally:
        service.in_flight -= 1
        watcher.cancel()
        engine_request.cancel()  # no-op once finished; frees the slots otherwise


async def collect(service: ChatService, dialect: Dialect, engine_request: EngineRequest, watcher: asyncio.Task,
                  echo: Echo) -> JSONResponse:
    n, clock = engine_request.choices, TokenClock(service.metrics)
    texts, reasons = [""] * n, ["stop"] * n
    logprobs = None if engine_request.params.logprobs is None else [[] for _ in range(n)]
    async with serving(service, engine_request, watcher):
        async for batch in engine_request.abatches(patience=ENGINE_PATIENCE):
            for event in batch:
                head, entries = echo.first(event.index, batch)
                texts[event.index] += head + event.text
                if logprobs is not None:
                    logprobs[event.index] += entries
                if event.token is not None:
                    clock.tokens(event.index)
                if event.logprob is not None and logprobs is not None:
                    logprobs[event.index].append(event.logprob)
                if event.finish_reason:
                    reasons[event.index] = event.finish_reason
        client_stayed = not engine_request.cancelled  # read before serving() cancels whatever is left on the way out
    if engine_request.error is not None:
        raise ApiError(engine_request.error.status, engine_request.error.message, kind="server_error")
    service.served += client_stayed
    return JSONResponse(dialect.whole(texts, reasons, logprobs, usage(engine_request)))


async def stream(service: ChatService, dialect: Dialect, engine_request: EngineRequest, watcher: asyncio.Task, echo: Echo,
                 include_usage: bool):
    clock = TokenClock(service.metrics)
    async with serving(service, engine_request, watcher):
        for opening in dialect.opening(engine_request.choices):
            yield opening
        counted = False  # from its first token: a stream still queued sends nothing, so takes no share of the rate
        try:
            async for batch in engine_request.abatches(ENGINE_PATIENCE, service.chunk_interval):
                if not counted:
                    service.streams, counted = service.streams + 1, True
                for index, count in Counter(e.index for e in batch if e.token is not None).items():
                    clock.tokens(index, count)
                chunks = batch_chunks(dialect, batch, engine_request.params.logprobs is not None, echo)
                if chunks:  # a token whose text is held back (half a character) sends nothing yet
                    yield "".join(chunks)
        finally:
            service.streams -= counted
    error = engine_request.error
    if error is not None:  # never a finish_reason that would pass a truncated answer off as complete
        yield sse(ApiError(error.status, error.message, kind="server_error").body())
    elif include_usage:
        yield dialect.chunk([], usage=usage(engine_request))
    yield sse("[DONE]")
    if error is None:
        service.served += 1


def batch_chunks(dialect: Dialect, batch: list, with_logprobs: bool, echo: Echo) -> list[str]:
    """The chunks for what arrived at once: per sample, its text (and logprobs) in one chunk, then its
    finish. Held for the stream interval, or when this loop fell behind the engine, one chunk carries several
    tokens and the whole batch leaves in one socket write: per chunk is what a stream costs."""
    samples: dict[int, list] = {}
    for event in batch:
        samples.setdefault(event.index, []).append(event)
    chunks = []
    for index, events in samples.items():
        head, entries = echo.first(index, events)
        text = head + "".join(e.text for e in events)
        logprobs = entries + [e.logprob for e in events if e.logprob] if with_logprobs else None
        if text or logprobs:
            chunks.append(dialect.chunk([dialect.delta(index, text, None, logprobs)]))
        reason = events[-1].finish_reason
        if reason in ("stop", "length"):
            chunks.append(dialect.chunk([dialect.delta(index, "", reason, None)]))
    return chunks


def usage(engine_request: EngineRequest) -> dict:
    prompt, completion = engine_request.prompt_tokens, engine_request.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def install_error_handlers(app: FastAPI) -> None:
    async def paced(request: Request, response: JSONResponse) -> JSONResponse:
        """A client's mistake is answered after its error budget allows (serving/error_pacing.py)."""
        await app.state.service.pacer.pace(request.client.host if request.client else "unknown")
        return response

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        response = JSONResponse(exc.body(), status_code=exc.status)
        return await paced(request, response) if exc.status < 500 else response

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return await paced(request, _validation_response(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        messages = {404: "no such route", 405: "method not allowed on this route"}
        response = error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code=None if exc.status_code != 404 else "not_found")
        return await paced(request, response)

    @app.exception_handler(ValidationError)
    async def schema_error(request, exc: ValidationError):
        return await paced(request, _validation_response(exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected error while serving a request")
        return error_response(500, f"internal server error ({type(exc).__name__})", kind="server_error")


def _validation_response(errors: list) -> JSONResponse:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = field_path(first.get("loc", ())) or None
    return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid value')}", param)


def field_path(loc: tuple) -> str:
    """pydantic's error location as the client wrote it: messages[0].content, not messages.0.content.str
    (a union adds the name of the member it tried, which is no field of the request)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "body" and not path:
            continue
        elif not part.isidentifier() or part in UNION_MEMBER_TAGS:
            break
        else:
            path += f".{part}" if path else part
    return path


UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "TextPart"}
