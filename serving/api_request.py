"""What a client may send to the OpenAI-compatible API, and how its body is read.

Everything a client can get wrong is caught here with a message that names
the field: bodies too large (413, before they are buffered) or too slow
(408), JSON that is malformed, nested too deeply, holds numbers too long to
parse or lone UTF-16 surrogates, and fields of the wrong type. Types are
strict, as OpenAI's are: `max_tokens: "5"` or `true` is refused, not coerced.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import ClientDisconnect

from nanochat.sampling import MAX_TOP_LOGPROBS, SEED_RANGE

MAX_JSON_DEPTH = 32  # a chat request nests 5 deep (body, messages, message, content, part)
MAX_N = 128  # samples per request; the engine's --max-batch bounds it further
MAX_INT = 2**31 - 1  # a token count or top_k beyond this is a mistake, not a wish
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is alone


class ApiError(Exception):
    """A request the server answers with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def not_supported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} not supported by this model", param, "unsupported_parameter")


# ---------------------------------------------------------------- schema


class _Strict(BaseModel):
    # unknown fields are ignored, as OpenAI does; known ones must have exactly the right type
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ContentPart(_Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":  # image_url, input_audio, file, ...
            raise not_supported("messages", f"content parts of type {json.dumps(self.type)} are")
        if self.text is None:
            raise ValueError("a text part needs its text")
        return self


class Message(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list | None = None  # accepted only when empty: this model cannot call tools
    function_call: dict | None = None

    @model_validator(mode="after")
    def _representable(self):
        if self.role in ("tool", "function"):
            raise not_supported("messages", f"{self.role} messages (function calling) are")
        if self.role not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"role must be system, developer, user or assistant, not {json.dumps(self.role)}")
        if self.tool_calls or self.function_call:
            raise not_supported("messages", "tool calls (function calling) are")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-SEED_RANGE, lt=SEED_RANGE)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def token_limit(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # accepted only in the forms that ask for nothing this model cannot do
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise not_supported("response_format", f"response_format {json.dumps(self.response_format.get('type'))} is")
        if self.tools:
            raise not_supported("tools", "tools (function calling) are")
        if self.functions:
            raise not_supported("functions", "functions (function calling) are")
        if self.tool_choice not in (None, "none", "auto"):
            raise not_supported("tool_choice", "tool_choice is")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        return self

    def token_limit(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_logprobs_wanted(self) -> None:
        return None


class CompletionRequest(_Sampling):
    """The legacy /v1/completions: text or token ids in, text out (what base models and evaluation
    harnesses use). Several prompts make several choices, n for each, in order."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's limit for this endpoint
    echo: bool = False
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT)  # 0 with echo: score the prompt, generate nothing
    add_special_tokens: bool = True  # vLLM's field: read the prompt after a <|bos|> (serving/prompts.py)

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise not_supported("suffix", "suffix is")
        if self.prompt == []:
            raise ApiError(400, "prompt must not be an empty list", "prompt")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """Each prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        return self.logprobs if self.echo else None


class TokenizeRequest(_Strict):
    """POST /tokenize, as vLLM takes it for text."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- reading the body


async def read_json(request, limit: int, timeout: float) -> dict:
    """The body as a JSON object, or an ApiError saying exactly what is wrong with it."""
    raw = await read_body(request, limit, timeout)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # bad syntax, bad UTF-8, or an integer too long to convert
        if "int_max_str_digits" in str(exc) or "Exceeds the limit" in str(exc):
            raise ApiError(400, "the JSON body holds a number with too many digits") from None
        raise ApiError(400, f"could not parse the JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    check_json_values(data)
    return data


async def read_body(request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the request body is larger than this server accepts ({limit:,} bytes)", code="request_too_large")
    chunks, size = [], 0

    async def receive():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than this server accepts ({limit:,} bytes)", code="request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    except ClientDisconnect:  # nobody will read the answer; say so without logging it as a server fault
        raise ApiError(400, "the client went away while sending its request", code="client_disconnected") from None
    return b"".join(chunks)


def check_json_values(data) -> None:
    """Refuse nesting past MAX_JSON_DEPTH and strings (keys too) holding lone surrogates,
    which no tokenizer or JSON encoder can take. Iterative, so depth cannot hurt it."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str) and LONE_SURROGATE.search(value):
            raise ApiError(400, "the request holds a string with an unpaired UTF-16 surrogate (invalid Unicode)")
