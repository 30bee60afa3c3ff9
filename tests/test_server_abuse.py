"""Client mistakes and misbehaving clients against the real server: never a 500, a reset or a hang.

One server for the module (scripts.chat_service on a tiny model, its output in a file the tests read):
- BAD_REQUESTS: each malformed request, on both endpoints and as raw bytes, gets its 4xx and an
  OpenAI error object {"error": {"message", "type", "param", "code"}}, and leaves no traceback in the log.
- Bodies at the HTTP level: too large by Content-Length (413 before a byte of it is sent), too large
  chunked (413), never finishing (408 within the body timeout); broken HTTP framing (uvicorn's 400).
- Concurrent abuse: streams nobody reads, clients that send and leave at once, slowloris connections,
  bodies that never finish, all together; a normal request is answered meanwhile and the server ends idle.
- The connection limit answers 503 at once, and the server recovers when connections go.

The server runs with a short --body-timeout, so the 408 cases are quick.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import httpx
import pytest

from serving.api_request import MAX_JSON_DEPTH
from serving.server import ServerSettings
from scripts.chat_service import KEEP_ALIVE_SECONDS
from served_model import SCRIPT_ANSWER, ServerProcess, make_served_model

BODY_TIMEOUT = 2.0  # seconds; the server's default (30) is too slow to wait for in a test
MAX_CONNECTIONS = 160  # above the ~110 sockets test_concurrent_abuse holds at once
MAX_BODY = ServerSettings().max_body_bytes  # the module server runs with the default --max-total-chars
READ_TIMEOUT = 10.0  # seconds any single read from the server may take before the test fails
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("abuse")
    make_served_model(base)
    srv = ServerProcess(base, "--body-timeout", str(BODY_TIMEOUT), "--max-batch", "8", "--max-queue", "128",
                        "--max-connections", str(MAX_CONNECTIONS))
    yield srv
    srv.close()


# ---------------------------------------------------------------- raw HTTP


class Reply(NamedTuple):
    status: int
    headers: dict
    body: bytes


def connect(server) -> socket.socket:
    return socket.create_connection(server.address, timeout=READ_TIMEOUT)


def request_head(path: str, length: int | None, method: str = "POST", extra: bytes = b"") -> bytes:
    framing = b"" if length is None else b"Content-Length: %d\r\n" % length
    return b"%s %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n%s%s\r\n" % (method.encode(), path.encode(), framing, extra)


def send_request(server, path: str, body: bytes) -> socket.socket:
    sock = connect(server)
    sock.sendall(request_head(path, len(body)) + body)
    return sock


def recv_some(sock: socket.socket, timeout: float = READ_TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    return sock.recv(65536)


def read_reply(sock: socket.socket, timeout: float = READ_TIMEOUT, already: bytes = b"") -> Reply:
    """One HTTP response from a raw socket; every read bounded by `timeout` (socket.timeout fails the test)."""
    buf = already
    while b"\r\n\r\n" not in buf:
        chunk = recv_some(sock, timeout)
        if not chunk:
            raise ConnectionError(f"the server closed the connection before a whole response head: {buf[:300]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(body) < need:
            chunk = recv_some(sock, timeout)
            if not chunk:
                raise ConnectionError(f"the server closed the connection {need - len(body)} bytes before the body's end")
            body += chunk
    elif headers.get("transfer-encoding") == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = recv_some(sock, timeout)
            if not chunk:
                raise ConnectionError(f"the server closed the connection inside a chunked body: {body[-300:]!r}")
            body += chunk
    else:  # uvicorn's own 400 carries neither: its body runs to the close
        while chunk := recv_some(sock, timeout):
            body += chunk
    return Reply(int(lines[0].split()[1]), headers, body)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `timeout`, discarding anything it sends first."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            if not recv_some(sock, left):
                return True
        except socket.timeout:
            return False
        except ConnectionError:
            return True
    return False


def close_all(socks) -> None:
    for sock in socks:
        sock.close()


def reset(sock: socket.socket) -> None:
    """Close abortively: the server sees a TCP reset, not a clean end."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------- checks


UNCHECKED = object()  # the param is wrong today: test_param_names_the_field_as_sent holds what it should be


def assert_openai_error(payload: dict, param=None, code=None) -> None:
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["type"] == "invalid_request_error" and error["code"] == code, error
    if param is None:
        assert error["param"] is None, error
    elif param is not UNCHECKED:  # the field the mistake is in; pydantic may add where inside it (".0.role")
        assert error["param"] == param or error["param"].startswith((param + ".", param + "[")), error


def wait_idle(server, bound: float = 10.0) -> dict:
    """/stats once nothing is in flight, queued or holding a slot; fails after `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        stats = httpx.get(server.url + "/stats", timeout=READ_TIMEOUT).json()
        if stats["requests_in_flight"] == 0 and stats["slots_in_use"] == 0 and stats["queue_depth"] == 0:
            return stats
        assert time.monotonic() < deadline, f"not idle {bound} s on: {stats}"
        time.sleep(0.1)


def assert_answers(server, within: float = READ_TIMEOUT) -> None:
    """Healthy, and a normal chat and completion are answered correctly within `within` seconds each."""
    assert httpx.get(server.url + "/health", timeout=within).json() == {"status": "ok"}
    started = time.monotonic()
    reply = httpx.post(server.url + CHAT, json={"messages": HI, "temperature": 0, "max_tokens": 60}, timeout=within)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == SCRIPT_ANSWER, reply.text
    text = httpx.post(server.url + COMP, json={"prompt": "hello world", "temperature": 0, "max_tokens": 3}, timeout=within)
    assert text.status_code == 200 and text.json()["object"] == "text_completion", text.text
    assert time.monotonic() - started < 2 * within


# ---------------------------------------------------------------- malformed requests


def chat(**fields) -> bytes:
    return json.dumps({"model": "nanochat", "messages": HI, **fields}).encode()


def comp(**fields) -> bytes:
    return json.dumps({"model": "nanochat", "prompt": "hello", **fields}).encode()


def chat_plus(fragment: bytes) -> bytes:
    """A chat request with raw JSON text spliced in, written as a client might (NaN, 1e999, 5,000 digits, \\u escapes)."""
    return chat()[:-1] + b", " + fragment + b"}"


def comp_plus(fragment: bytes) -> bytes:
    return comp()[:-1] + b", " + fragment + b"}"


def chat_saying(raw: bytes) -> bytes:
    """A chat request whose one message is `raw`, byte for byte (invalid UTF-8 included)."""
    return b'{"model": "nanochat", "messages": [{"role": "user", "content": "' + raw + b'"}]}'


def padded_chat(size: int, **fields) -> bytes:
    """A chat request of exactly `size` bytes, made up by an ignored string field."""
    empty = chat(metadata="", **fields)
    return chat(metadata="p" * (size - len(empty)), **fields)


def nested(levels: int) -> bytes:
    """An ignored field whose innermost value sits `levels` deep, the body object being level 1."""
    return b'"metadata": ' + b"[" * (levels - 2) + b"0" + b"]" * (levels - 2)


def bad(name, path, body, status=400, param=None, code=None, method="POST"):
    return pytest.param(method, path, body, status, param, code, id=name)


UNSUPPORTED = "unsupported_parameter"
TOO_LONG = "context_length_exceeded"

BAD_REQUESTS = [
    # JSON that parses badly, or too deep, or into something that is not a request
    bad("nesting 100,000 [ (chat)", CHAT, b"[" * 100_000),
    bad("nesting 100,000 [ (completions)", COMP, b"[" * 100_000),
    bad("nesting 40,000 objects", CHAT, b'{"a":' * 40_000 + b"0" + b"}" * 40_000),
    bad(f"nesting {MAX_JSON_DEPTH + 1} in an ignored field (chat)", CHAT, chat_plus(nested(MAX_JSON_DEPTH + 1))),
    bad(f"nesting {MAX_JSON_DEPTH + 1} in an ignored field (completions)", COMP, comp_plus(nested(MAX_JSON_DEPTH + 1))),
    bad("5,000-digit integer in an ignored field", CHAT, chat_plus(b'"metadata": ' + b"9" * 5000)),
    bad("5,000-digit integer in max_tokens (completions)", COMP, comp_plus(b'"max_tokens": ' + b"9" * 5000)),
    bad("4,000-digit integer in max_tokens", CHAT, chat_plus(b'"max_tokens": ' + b"9" * 4000), param="max_tokens"),
    bad("4,000-digit integer in seed", CHAT, chat_plus(b'"seed": ' + b"9" * 4000), param="seed"),
    bad("400-digit integer in temperature", CHAT, chat_plus(b'"temperature": 1' + b"0" * 400), param="temperature"),
    bad("1e999 in temperature", CHAT, chat_plus(b'"temperature": 1e999'), param="temperature"),
    bad("NaN in temperature", CHAT, chat_plus(b'"temperature": NaN'), param="temperature"),
    bad("Infinity in top_p", CHAT, chat_plus(b'"top_p": Infinity'), param="top_p"),
    bad("-Infinity in temperature (completions)", COMP, comp_plus(b'"temperature": -Infinity'), param="temperature"),
    bad("NaN in top_p (completions)", COMP, comp_plus(b'"top_p": NaN'), param="top_p"),
    bad("body null", CHAT, b"null"),
    bad("body a number", COMP, b"5"),
    bad("body only whitespace", CHAT, b" \r\n\t "),
    bad("data after the object", CHAT, chat() + b" {}"),
    bad("single-quoted JSON", CHAT, b"{'messages': []}"),
    bad("trailing comma", CHAT, b'{"messages": [{"role": "user", "content": "hi"},]}'),
    bad("raw control character in a string", CHAT, chat_saying(b"h\x01i")),
    bad("duplicate key, the last of the wrong type", CHAT, chat_plus(b'"max_tokens": 5, "max_tokens": "5"'), param="max_tokens"),
    # text that is not Unicode
    bad("lone surrogate in model", CHAT, chat(model="\ud800")),
    bad("lone surrogate in a message", CHAT, chat_saying(b"hi \\udbff there")),
    bad("lone low surrogate in a content part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}])),
    bad("surrogate pair reversed", CHAT, chat_saying(b"\\ude00\\ud83d")),
    bad("lone surrogate in a stop string", CHAT, chat(stop=["ok", "\ud800"])),
    bad("lone surrogate in a dict key", CHAT, chat_plus(b'"\\udc00": 1')),
    bad("lone surrogate in a prompt", COMP, comp(prompt="a\udfffb")),
    bad("lone surrogate in a prompt list", COMP, comp(prompt=["\ud800"])),
    bad("invalid UTF-8 byte", CHAT, chat_saying(b"\xff")),
    bad("overlong UTF-8", CHAT, chat_saying(b"\xc0\xaf")),
    bad("truncated UTF-8 sequence", CHAT, chat_saying(b"\xe2\x82")),
    bad("surrogate encoded as UTF-8 bytes", CHAT, chat_saying(b"\xed\xa0\x80")),
    bad("invalid UTF-8 in a prompt", COMP, b'{"prompt": "\xfe\xfe"}'),
    # wrong types: nothing is coerced
    bad("model a number", CHAT, chat(model=5), param="model"),
    bad("model an object", COMP, comp(model={"id": "nanochat"}), param="model"),
    bad("messages an object", CHAT, chat(messages={"role": "user", "content": "hi"}), param="messages"),
    bad("messages null", CHAT, chat(messages=None), param="messages"),
    bad("a message that is a number", CHAT, chat(messages=[5]), param="messages"),
    bad("role null", CHAT, chat(messages=[{"role": None, "content": "hi"}]), param="messages"),
    bad("content an object", CHAT, chat(messages=[{"role": "user", "content": {"text": "hi"}}]), param="messages"),
    bad("content part image_url", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), param="messages", code=UNSUPPORTED),
    bad("content part without text", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), param="messages"),
    bad("content part text a number", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), param="messages"),
    bad("stream 1", CHAT, chat(stream=1), param="stream"),
    bad("stream 1 (completions)", COMP, comp(stream=1), param="stream"),
    bad("stream_options a string", CHAT, chat(stream=True, stream_options="yes"), param="stream_options"),
    bad("include_usage a string", CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), param="stream_options"),
    bad("include_usage 1 (completions)", COMP, comp(stream=True, stream_options={"include_usage": 1}), param="stream_options"),
    bad("temperature true", CHAT, chat(temperature=True), param="temperature"),
    bad('temperature "0.5"', CHAT, chat(temperature="0.5"), param="temperature"),
    bad('top_p "1"', CHAT, chat(top_p="1"), param="top_p"),
    bad("top_k 1.0", CHAT, chat(top_k=1.0), param="top_k"),
    bad("top_k true", CHAT, chat(top_k=True), param="top_k"),
    bad("max_tokens true", CHAT, chat(max_tokens=True), param="max_tokens"),
    bad('max_tokens "5"', CHAT, chat(max_tokens="5"), param="max_tokens"),
    bad("max_tokens 5.0", CHAT, chat(max_tokens=5.0), param="max_tokens"),
    bad("max_tokens true (completions)", COMP, comp(max_tokens=True), param="max_tokens"),
    bad('max_tokens "5" (completions)', COMP, comp(max_tokens="5"), param="max_tokens"),
    bad("max_completion_tokens true", CHAT, chat(max_completion_tokens=True), param="max_completion_tokens"),
    bad("n 1.0", CHAT, chat(n=1.0), param="n"),
    bad("n true", CHAT, chat(n=True), param="n"),
    bad("n null", CHAT, chat(n=None), param="n"),
    bad("n 1.0 (completions)", COMP, comp(n=1.0), param="n"),
    bad("seed 1.5", CHAT, chat(seed=1.5), param="seed"),
    bad("seed true", CHAT, chat(seed=True), param="seed"),
    bad("stop a number", CHAT, chat(stop=5), param="stop"),
    bad("stop a list of numbers", CHAT, chat(stop=[1]), param="stop"),
    bad("stop an object", COMP, comp(stop={"a": 1}), param="stop"),
    bad("logprobs 1", CHAT, chat(logprobs=1), param="logprobs"),
    bad('logprobs "true"', CHAT, chat(logprobs="true"), param="logprobs"),
    bad('top_logprobs "2"', CHAT, chat(logprobs=True, top_logprobs="2"), param="top_logprobs"),
    bad("logprobs true (completions)", COMP, comp(logprobs=True), param="logprobs"),
    bad("response_format a string", CHAT, chat(response_format="json"), param="response_format"),
    bad("tools an object", CHAT, chat(tools={"type": "function"}), param="tools"),
    bad("tool_choice a number", CHAT, chat(tool_choice=5), param="tool_choice"),
    bad("a token id outside the vocabulary", COMP, comp(prompt=[1, 2, 10**6]), param="prompt"),
    bad("a negative token id", COMP, comp(prompt=[[1], [-1]]), param="prompt[1]"),
    bad("token ids and text in one list", COMP, comp(prompt=[1, "a"]), param="prompt"),
    bad("an empty list of token ids", COMP, comp(prompt=[[]], add_special_tokens=False), param="prompt[0]"),
    bad("prompt an object", COMP, comp(prompt={"text": "hello"}), param="prompt"),
    bad("prompt null", COMP, comp(prompt=None), param="prompt"),
    bad("echo 1", COMP, comp(echo=1), param="echo"),
    bad("suffix a number", COMP, comp(suffix=5), param="suffix"),
    # out of range
    bad("seed 2**64", CHAT, chat(seed=2**64), param="seed"),
    bad("seed 2**63", CHAT, chat(seed=2**63), param="seed"),
    bad("seed -2**63-1", CHAT, chat(seed=-2**63 - 1), param="seed"),
    bad("seed -2**63-1 (completions)", COMP, comp(seed=-2**63 - 1), param="seed"),
    bad("top_logprobs 21", CHAT, chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    bad("top_logprobs -1", CHAT, chat(logprobs=True, top_logprobs=-1), param="top_logprobs"),
    bad("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), param="top_logprobs"),
    bad("n 129", CHAT, chat(n=129), param="n"),
    bad("n 9 above --max-batch (completions)", COMP, comp(n=9), param="n"),
    bad("max_tokens 2**31", CHAT, chat(max_tokens=2**31), param="max_tokens"),
    bad("max_tokens -1", CHAT, chat(max_tokens=-1), param="max_tokens"),
    bad("max_tokens over the context (completions)", COMP, comp(max_tokens=2000), param="max_tokens", code=TOO_LONG),
    bad("top_k 2**31", CHAT, chat(top_k=2**31), param="top_k"),
    bad("logprobs 6 (completions)", COMP, comp(logprobs=6), param="logprobs"),
    bad("logprobs -1 (completions)", COMP, comp(logprobs=-1), param="logprobs"),
    bad("a message longer than the context", CHAT, chat(messages=[{"role": "user", "content": "x" * 4000}]), param="messages", code=TOO_LONG),
    bad("a prompt longer than the context", COMP, comp(prompt="x" * 4000), param=UNCHECKED, code=TOO_LONG),
    bad("a prompt over --max-total-chars", COMP, comp(prompt="x" * 32_001), param="prompt"),
    bad("a body one byte over the size limit", CHAT, padded_chat(MAX_BODY + 1), status=413, code="request_too_large"),
    # what this model cannot do
    bad("response_format json_object", CHAT, chat(response_format={"type": "json_object"}), param="response_format", code=UNSUPPORTED),
    bad("response_format json_schema", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        param="response_format", code=UNSUPPORTED),
    bad("response_format without a type", CHAT, chat(response_format={}), param="response_format", code=UNSUPPORTED),
    bad("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), param="tools", code=UNSUPPORTED),
    bad("functions", CHAT, chat(functions=[{"name": "f", "parameters": {}}]), param=UNCHECKED, code=UNSUPPORTED),
    bad('tool_choice "required"', CHAT, chat(tool_choice="required"), param="tool_choice", code=UNSUPPORTED),
    bad("tool_choice a named function", CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}), param="tool_choice", code=UNSUPPORTED),
    bad("tool role", CHAT, chat(messages=[{"role": "tool", "tool_call_id": "1", "content": "x"}]), param="messages", code=UNSUPPORTED),
    bad("function role", CHAT, chat(messages=[{"role": "function", "name": "f", "content": "x"}]), param="messages", code=UNSUPPORTED),
    bad("a tool call and its result in the history", CHAT, chat(messages=[
        HI[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "42"}, HI[0]]), param="messages", code=UNSUPPORTED),
    bad("suffix (completions)", COMP, comp(suffix=" the end"), param="suffix", code=UNSUPPORTED),
    bad("the second of two prompts longer than the context", COMP, comp(prompt=["hello", "x " * 2000]), param="prompt[1]", code=TOO_LONG),
    bad("an empty list of prompts", COMP, comp(prompt=[]), param="prompt"),
    bad("messages sent to completions", COMP, json.dumps({"messages": HI}).encode(), param="prompt"),
    bad("unknown model (completions)", COMP, comp(model="gpt-9"), status=404, param="model", code="model_not_found"),
    # routes and methods
    bad("GET completions", COMP, None, status=405, method="GET"),
    bad("PUT chat completions", CHAT, chat(), status=405, method="PUT"),
    bad("DELETE health", "/health", None, status=405, method="DELETE"),
    bad("POST embeddings", "/v1/embeddings", json.dumps({"input": "hi"}).encode(), status=404, code="not_found"),
    bad("a percent-encoded byte that is not UTF-8", "/v1/%ff", None, status=404, code="not_found", method="GET"),
]


def test_the_table_holds_at_least_sixty_kinds():
    names = [p.id for p in BAD_REQUESTS]
    assert len(set(names)) == len(names) >= 60


@pytest.mark.parametrize("method,path,body,status,param,code", BAD_REQUESTS)
def test_bad_request_gets_its_status_and_an_openai_error(server, method, path, body, status, param, code):
    log_start = server.log_size()
    reply = httpx.request(method, server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=READ_TIMEOUT)
    assert reply.status_code == status, reply.text
    assert_openai_error(reply.json(), param, code)
    assert "Traceback" not in server.log(log_start)


ACCEPTED = [  # each asks for 2 tokens, so that the row is quick
    pytest.param(CHAT, chat_plus(b'"max_tokens": 2, ' + nested(MAX_JSON_DEPTH)), id=f"nesting exactly {MAX_JSON_DEPTH} (chat)"),
    pytest.param(COMP, comp_plus(b'"max_tokens": 2, ' + nested(MAX_JSON_DEPTH)), id=f"nesting exactly {MAX_JSON_DEPTH} (completions)"),
    # json.dumps writes the emoji as the escaped pair \ud83d\ude00
    pytest.param(CHAT, chat(messages=[{"role": "user", "content": "\U0001F600 hi"}], max_tokens=2), id="an escaped surrogate pair"),
    pytest.param(CHAT, chat(seed=-2**63, max_tokens=2), id="seed -2**63"),
    pytest.param(COMP, comp(seed=2**63 - 1, max_tokens=2), id="seed 2**63-1"),
    pytest.param(CHAT, chat(logprobs=True, top_logprobs=20, n=8, max_tokens=2), id="top_logprobs 20, n at --max-batch"),
    pytest.param(CHAT, chat(response_format={"type": "text"}, tools=[], tool_choice="none", max_tokens=2), id="the no-op forms of the unsupported fields"),
    pytest.param(COMP, comp(prompt=["hello"], echo=False, suffix="", max_tokens=2), id="a list of one prompt, echo false, empty suffix"),
    pytest.param(CHAT, padded_chat(MAX_BODY, max_tokens=2), id="a body exactly at the size limit"),
]


@pytest.mark.parametrize("path,body", ACCEPTED)
def test_just_inside_the_limits_is_answered(server, path, body):
    reply = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=READ_TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == json.loads(body).get("n", 1)


def test_the_server_answers_normally_after_the_table(server):
    assert_answers(server)
    wait_idle(server)


WRONG_PARAM = [  # (what the server says today)
    pytest.param(CHAT, chat(stop=5), "stop", id="stop a number ('stop.str')"),
    pytest.param(CHAT, chat(stop=[1]), "stop", id="stop a list of numbers ('stop.str')"),
    pytest.param(CHAT, chat(tool_choice=5), "tool_choice", id="tool_choice a number ('tool_choice.str')"),
    pytest.param(COMP, comp(prompt=[[1], "a"]), "prompt", id="a token-id list and text in one list ('prompt.list[str]')"),
    pytest.param(CHAT, chat(messages=[{"role": "user", "content": {"text": "hi"}}]), "messages[0].content",
                 id="content an object ('messages.0.content.str')"),
    pytest.param(CHAT, chat(functions=[{"name": "f", "parameters": {}}]), "functions", id="functions ('tools')"),
    pytest.param(COMP, comp(prompt="x" * 4000), "prompt", id="a completions prompt longer than the context ('messages')"),
]


@pytest.mark.parametrize("path,body,param", WRONG_PARAM)
def test_param_names_the_field_as_sent(server, path, body, param):
    reply = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=READ_TIMEOUT)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


# ---------------------------------------------------------------- bodies at the HTTP level


@pytest.mark.parametrize("path", [CHAT, COMP])
@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["plain", "expect 100-continue"])
def test_too_large_by_content_length_is_refused_before_the_body_is_sent(server, path, expect):
    sock = connect(server)
    try:
        sock.sendall(request_head(path, 10**9, extra=expect))  # and not one byte of the body, ever
        reply = read_reply(sock)  # a "100 Continue" would show here as status 100
    finally:
        sock.close()
    assert reply.status == 413, reply
    assert_openai_error(json.loads(reply.body), code="request_too_large")


@pytest.mark.parametrize("finished", [True, False], ids=["with its last chunk", "never finished"])
def test_too_large_chunked_body_is_refused(server, finished):
    payload = b"p" * (MAX_BODY + 8192)
    chunks = b"".join(b"%x\r\n%s\r\n" % (8192, payload[i:i + 8192]) for i in range(0, len(payload), 8192))
    sock = connect(server)
    try:
        sock.sendall(request_head(CHAT, None, extra=b"Transfer-Encoding: chunked\r\n") + chunks + (b"0\r\n\r\n" if finished else b""))
        reply = read_reply(sock)
    finally:
        sock.close()
    assert reply.status == 413, reply  # not the 408 an unfinished body would get after BODY_TIMEOUT
    assert_openai_error(json.loads(reply.body), code="request_too_large")


CHUNKED = b"Transfer-Encoding: chunked\r\n"
NEVER_FINISHED = {  # name: (what is sent, then a byte sent every 0.2 s until the server answers, or None)
    "10 of 100 bytes": (request_head(CHAT, 100) + b'{"model": ', None),
    "headers and no body": (request_head(COMP, 100), None),
    "a chunk, never the last one": (request_head(CHAT, None, extra=CHUNKED) + b'a\r\n{"model": \r\n', None),
    "a byte every 0.2 s": (request_head(CHAT, 100) + b"{", b" "),
}


def send_and_stall(server, start: bytes, trickle: bytes | None) -> tuple[float, Reply]:
    """Send `start` (then `trickle` every 0.2 s) and read the answer; seconds from the first byte to it, and the answer."""
    sock = connect(server)
    try:
        sock.sendall(start)
        sent = time.monotonic()
        while trickle and time.monotonic() - sent < BODY_TIMEOUT + 5 and not select.select([sock], [], [], 0.2)[0]:
            sock.sendall(trickle)  # 35 bytes at most: the body never reaches its 100
        reply = read_reply(sock)
        return time.monotonic() - sent, reply
    finally:
        sock.close()


def test_a_body_that_never_finishes_gets_408_within_the_body_timeout(server):
    with ThreadPoolExecutor(len(NEVER_FINISHED)) as pool:
        results = dict(zip(NEVER_FINISHED, pool.map(lambda sent: send_and_stall(server, *sent), NEVER_FINISHED.values())))
    for name, (elapsed, reply) in results.items():
        assert reply.status == 408, (name, reply)
        assert_openai_error(json.loads(reply.body), code="request_timeout")
        assert BODY_TIMEOUT - 0.5 < elapsed < BODY_TIMEOUT + 5, (name, elapsed)
    assert_answers(server)


BROKEN_HTTP = [
    pytest.param(request_head(CHAT, None, extra=b"Content-Length: abc\r\n") + b"{}", id="Content-Length not a number"),
    pytest.param(request_head(CHAT, None, extra=b"Content-Length: -1\r\n") + b"{}", id="Content-Length negative"),
    pytest.param(request_head(CHAT, None, extra=b"Content-Length: 2\r\nContent-Length: 3\r\n") + b"{}", id="two different Content-Lengths"),
    pytest.param(request_head(CHAT, None, extra=b"Content-Length: " + b"9" * 100 + b"\r\n"), id="a 100-digit Content-Length"),
    pytest.param(request_head(CHAT, None, extra=CHUNKED) + b"zz\r\n{}\r\n0\r\n\r\n", id="chunk size not hex"),
    pytest.param(request_head(CHAT, None, extra=b"Transfer-Encoding: gzip\r\n") + b"{}", id="Transfer-Encoding gzip"),
    pytest.param(bytes.fromhex("160301020001000001fc0303") + bytes(64), id="a TLS ClientHello"),
    pytest.param(b"GET /health HTTP/1.1\r\n\r\n", id="HTTP/1.1 without Host"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n", id="a header line without a colon"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: test\r\nX Space: 1\r\n\r\n", id="a space in a header name"),
    pytest.param(b"GET /v1/mod\xffels HTTP/1.1\r\nHost: test\r\n\r\n", id="a raw non-ASCII byte in the path"),
]


def send_broken(server, raw: bytes) -> tuple[Reply, bool]:
    sock = connect(server)
    try:
        sock.sendall(raw)
        reply = read_reply(sock)
        return reply, closed_by_server(sock, 5)
    finally:
        sock.close()


@pytest.mark.parametrize("raw", BROKEN_HTTP)
def test_broken_http_gets_400_and_the_connection_closed(server, raw):
    reply, closed = send_broken(server, raw)
    assert reply.status == 400 and closed, reply
    assert httpx.get(server.url + "/health", timeout=READ_TIMEOUT).status_code == 200


@pytest.mark.parametrize("raw", BROKEN_HTTP)
def test_broken_http_gets_an_openai_error(server, raw):
    reply, _ = send_broken(server, raw)
    assert reply.status == 400 and reply.headers.get("content-type", "").startswith("application/json"), reply
    assert_openai_error(json.loads(reply.body))


# ---------------------------------------------------------------- misbehaving clients, many at once

NORMAL_BOUND = 10.0  # seconds a normal request may take while the abuse runs (a few on a quiet machine)
ABUSE_BOUND = 40.0  # seconds the whole concurrent-abuse test may take
SLOWLORIS_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: te"  # a request head that never ends


def test_concurrent_abuse_leaves_the_server_answering_and_idle(server):
    started = time.monotonic()
    streams, first_bytes, slowloris, stalled = [], {}, [], []
    try:
        for i in range(40):  # streams whose client never reads (odd ones: the first bytes, then nothing more)
            body = chat(stream=True, temperature=0, max_tokens=40, n=1 + i % 2, messages=[{"role": "user", "content": f"hello {i} world"}])
            streams.append(send_request(server, CHAT, body))
            if i % 2:
                first_bytes[i] = recv_some(streams[-1])
        for i in range(40):  # fire and forget: the whole request, then gone at once, half of them with a reset
            sock = send_request(server, *((CHAT, chat(max_tokens=200, n=2)) if i % 2 else (COMP, comp(max_tokens=200, n=2))))
            reset(sock) if i % 4 < 2 else sock.close()
        for _ in range(20):
            slowloris.append(connect(server))
            slowloris[-1].sendall(SLOWLORIS_HEAD)
        for _ in range(10):  # bodies that never finish: each gets its 408 after BODY_TIMEOUT
            stalled.append(connect(server))
            stalled[-1].sendall(request_head(CHAT, 100) + b'{"model": ')

        asked = time.monotonic()
        reply = httpx.post(server.url + CHAT, json={"messages": HI, "temperature": 0, "max_tokens": 60}, timeout=NORMAL_BOUND)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == SCRIPT_ANSWER, reply.text
        assert time.monotonic() - asked < NORMAL_BOUND
        wait_idle(server)  # every abusive socket still open: none of them holds a request, a slot or the queue

        for i, sock in enumerate(streams):  # answered in full, though nobody was reading
            answer = read_reply(sock, already=first_bytes.get(i, b""))
            assert answer.status == 200 and b"data: [DONE]" in answer.body and b'"error"' not in answer.body, (i, answer)
        for sock in stalled:
            assert read_reply(sock).status == 408
    finally:
        close_all(streams + slowloris + stalled)
    assert_answers(server)
    wait_idle(server)
    assert time.monotonic() - started < ABUSE_BOUND


def wait_serving(server, bound: float = 5.0) -> None:
    """/health 200 within `bound` seconds (closed sockets reach the server a moment after close())."""
    deadline = time.monotonic() + bound
    while httpx.get(server.url + "/health", timeout=READ_TIMEOUT).status_code != 200:
        assert time.monotonic() < deadline, f"no /health 200 within {bound} s"
        time.sleep(0.1)


def probe_with_held_connections(server, held_count: int) -> tuple[float, Reply]:
    """Hold `held_count` connections that send nothing, then ask for /health on one more: seconds to the answer, and it."""
    held = [connect(server) for _ in range(held_count)]  # accepted in order, so all are counted before the probe's request
    try:
        probe = connect(server)
        try:
            asked = time.monotonic()
            probe.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            reply = read_reply(probe, timeout=5)
            return time.monotonic() - asked, reply
        finally:
            probe.close()
    finally:
        close_all(held)
        wait_serving(server)


def test_connection_limit_answers_503_at_once_and_recovers(server):
    elapsed, reply = probe_with_held_connections(server, MAX_CONNECTIONS)
    assert reply.status == 503 and elapsed < 5, reply
    assert_answers(server)
    wait_idle(server)


def test_connection_limit_serves_as_many_as_it_says(server):
    _, reply = probe_with_held_connections(server, MAX_CONNECTIONS - 1)
    assert reply.status == 200, reply


def test_connection_limit_503_is_an_openai_error(server):
    _, reply = probe_with_held_connections(server, MAX_CONNECTIONS)
    assert reply.status == 503 and reply.headers.get("content-type", "").startswith("application/json"), reply
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"] == "server_error"


def closed_within(socks: list[socket.socket], timeout: float) -> list[bool]:
    """For each socket, whether the server closed it (after whatever it sent) within `timeout` seconds of now."""
    closed = [False] * len(socks)
    deadline = time.monotonic() + timeout
    while not all(closed) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s, c in zip(socks, closed) if not c], [], [], left)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                closed[socks.index(sock)] = True
    return closed


def test_connections_without_a_request_are_closed(server):
    after_413 = [connect(server) for _ in range(3)]  # first: their requests must get in under the limit
    silent, slowloris = [], []
    try:
        for sock in after_413:
            sock.sendall(request_head(CHAT, MAX_BODY + 1))
            assert read_reply(sock).status == 413
            sock.sendall(b"p" * (MAX_BODY + 1))  # the body the 413 refused, sent all the same
        silent += [connect(server) for _ in range(MAX_CONNECTIONS // 2)]
        slowloris += [connect(server) for _ in range(MAX_CONNECTIONS - len(silent) - len(after_413))]
        for sock in slowloris:
            sock.sendall(SLOWLORIS_HEAD)
        bound = max(KEEP_ALIVE_SECONDS, BODY_TIMEOUT) + 1
        closed = closed_within(silent + slowloris + after_413, bound)
        kinds = {"sent nothing": closed[:len(silent)], "slowloris": closed[len(silent):-len(after_413)], "a body after its 413": closed[-len(after_413):]}
        assert all(all(c) for c in kinds.values()), {kind: f"{c.count(False)} of {len(c)} open after {bound} s" for kind, c in kinds.items()}
        assert httpx.get(server.url + "/health", timeout=READ_TIMEOUT).status_code == 200
    finally:
        close_all(silent + slowloris + after_413)
        wait_serving(server)


def test_a_client_leaving_mid_body_is_not_an_unexpected_error(server):
    log_start = server.log_size()
    for i in range(4):
        sock = connect(server)
        sock.sendall(request_head(CHAT, 100))
        time.sleep(0.05)  # the server is reading the body now
        sock.sendall(b'{"model": ')
        time.sleep(0.05)
        reset(sock) if i % 2 else sock.close()
    assert_answers(server)
    time.sleep(0.5)  # the log lines are written as the server notices the four leave
    log = server.log(log_start)
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
