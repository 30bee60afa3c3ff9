"""One FastAPI app, two faces: an OpenAI-compatible chat API and a web page.

    POST /v1/chat/completions   (streaming or not; the `openai` client works unchanged)
    GET  /v1/models, /health, /stats, and / (the chat page)

Requests share the engine's continuous batching through an EngineWorker
thread. Every client mistake gets a 4xx with OpenAI's error object; the
server keeps serving whatever it is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.engine import Engine, EngineWorker, Request as EngineRequest, visible_to_parts
from nanochat.sampling import SamplingParams

UI_PAGE = Path(__file__).parent / "ui" / "index.html"
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------- request schema


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI does


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatRequest(_Lenient):
    messages: list[Message]
    model: str | None = None
    stream: StrictBool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops


# ---------------------------------------------------------------- the app


class ChatService:
    """The state behind the routes: engine, settings, counters."""

    def __init__(self, engine: Engine, settings: ServerSettings, model_info: dict):
        self.engine, self.settings, self.model_info = engine, settings, model_info
        self.started = time.time()
        self.served = 0
        self.in_flight = 0
        self.worker: EngineWorker | None = None

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

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
            if m.role == "system" and i != 0:
                raise ApiError(400, "a system message may only come first", f"messages[{i}].role")
            if m.role == "user" and not text.strip():
                raise ApiError(400, f"messages[{i}] is empty", f"messages[{i}].content")
        if total > s.max_total_chars:
            raise ApiError(400, f"the conversation has {total} characters (limit {s.max_total_chars})", "messages")
        turns = [m for m in msgs if m.role != "system"]
        for i, m in enumerate(turns):
            if m.role != ("user" if i % 2 == 0 else "assistant"):
                raise ApiError(400, "after an optional system message, turns must alternate user/assistant, starting and ending with user", "messages")
        if not turns or turns[-1].role != "user":
            raise ApiError(400, "the last message must be from the user", "messages")
        return [{"role": m.role, "content": visible_to_parts(m.text()) if m.role == "assistant" else m.text()} for m in msgs]

    def sampling(self, body: ChatRequest, prompt_len: int) -> SamplingParams:
        s, room = self.settings, self.engine.max_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; the model's context is {self.engine.max_len}", "messages", "context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > room:
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{param}={asked} does not fit: the prompt uses {prompt_len} of {self.engine.max_len} tokens", param, "context_length_exceeded")
        if body.n > self.engine.cache.slots:
            raise ApiError(400, f"n must be at most {self.engine.cache.slots}", "n")
        return SamplingParams(
            temperature=s.temperature if body.temperature is None else body.temperature,
            top_k=s.top_k if body.top_k is None else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=asked or min(s.max_tokens or room, room),
            seed=body.seed, stop=tuple(body.stop or ()),
        )

    def start(self, body: ChatRequest, loop) -> EngineRequest:
        if body.model not in (None, "", self.settings.model_id):
            raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{self.settings.model_id}'", "model", "model_not_found")
        messages = self.conversation(body)
        prompt = self.engine.tokenizer.render_for_completion({"messages": messages})
        params = self.sampling(body, len(prompt))
        if self.engine.queue_depth() >= self.settings.max_queue:
            raise ApiError(429, "the server is busy (request queue full); retry shortly", code="queue_full", kind="rate_limit_error")
        return self.engine.submit(prompt, params, body.n, loop=loop)

    def page_config(self) -> dict:
        s = self.settings
        return {"model": s.model_id, "temperature": s.temperature, "top_k": s.top_k, "max_tokens": s.max_tokens,
                "context_length": self.engine.max_len, "api_key_required": bool(s.api_key)}

    def stats(self) -> dict:
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "requests_served": self.served,
            "requests_in_flight": self.in_flight,
            "queue_depth": self.engine.queue_depth(),
            "tokens_generated": self.engine.tokens_generated,
            "recent_tokens_per_second": round(self.engine.recent_rate(), 1),
            "model": self.model_info,
        }


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def create_app(engine: Engine, settings: ServerSettings, model_info: dict) -> FastAPI:
    service = ChatService(engine, settings, model_info)

    @asynccontextmanager
    async def lifespan(_app):
        service.worker = EngineWorker(engine)
        service.worker.start()
        yield
        service.worker.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.service = service
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        alive = service.worker is not None and service.worker.is_alive()
        return JSONResponse({"status": "ok" if alive else "starting"}, status_code=200 if alive else 503)

    @app.get("/config")
    async def config():
        """What a page needs before its first request: the server's sampling defaults and the context."""
        return service.page_config()

    @app.get("/stats")
    async def stats(request: Request):
        service.check_auth(request)
        return service.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_auth(request)
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": int(service.started),
                                            "owned_by": "nanochat", "context_length": engine.max_len, "metadata": model_info}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service.check_auth(request)
        body = await parse_body(request)
        engine_request = service.start(body, asyncio.get_running_loop())
        if body.stream:
            return StreamingResponse(stream_chunks(service, body, engine_request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(service, body, engine_request)

    @app.get("/")
    async def page():
        return FileResponse(UI_PAGE, media_type="text/html")

    return app


async def parse_body(request: Request) -> ChatRequest:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"could not parse the JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    return ChatRequest.model_validate(data)


async def complete(service: ChatService, body: ChatRequest, engine_request: EngineRequest) -> JSONResponse:
    texts, reasons = [""] * body.n, ["stop"] * body.n
    service.in_flight += 1
    try:
        async for event in engine_request.aevents():
            texts[event.index] += event.text
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
    finally:
        service.in_flight -= 1
        engine_request.cancel()  # no-op once finished; frees the slots if the client went away
    if "error" in reasons:
        raise ApiError(500, "generation failed inside the server", kind="server_error")
    service.served += 1
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse({"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
                         "model": service.settings.model_id, "choices": choices, "usage": usage(engine_request)})


def usage(engine_request: EngineRequest) -> dict:
    prompt, completion = len(engine_request.prompt), engine_request.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream_chunks(service: ChatService, body: ChatRequest, engine_request: EngineRequest):
    cid, created, model = completion_id(), int(time.time()), service.settings.model_id

    def chunk(choices: list, **extra) -> str:
        payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    service.in_flight += 1
    try:
        for i in range(body.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
        async for event in engine_request.aevents():
            if event.text:
                yield chunk([{"index": event.index, "delta": {"content": event.text}, "finish_reason": None, "logprobs": None}])
            if event.finish_reason:
                reason = "length" if event.finish_reason == "length" else "stop"
                yield chunk([{"index": event.index, "delta": {}, "finish_reason": reason, "logprobs": None}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=usage(engine_request))
        yield "data: [DONE]\n\n"
        service.served += 1
    finally:
        service.in_flight -= 1
        engine_request.cancel()  # the client may have gone: free the slot now


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        messages = {404: "no such route", 405: "method not allowed on this route"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code=None if exc.status_code != 404 else "not_found")

    @app.exception_handler(ValidationError)
    async def schema_error(_request, exc: ValidationError):
        return _validation_response(exc.errors())

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected error while serving a request")
        return error_response(500, f"internal server error ({type(exc).__name__})", kind="server_error")


def _validation_response(errors: list) -> JSONResponse:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid value')}", param)
