"""The server under faults, for real (uvicorn on 127.0.0.1): clients that leave cancel their work in every
mode, deadlines, SIGTERM with answers in flight, a dead engine, and no CPU used while idle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from nanochat.engine import Engine
from serving.server import ServerSettings, create_app
from nanochat.tokenizer import Tokenizer
from served_model import ROOT, ServerProcess, free_port, make_served_model
from test_engine import random_model
from test_engine_faults import Crash, Faulty

LONG_ANSWER = "hello world " * 400  # ~800 tokens, and endless: seconds of decoding, so a client can leave midway
GO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("long")
    make_served_model(base, sequence_len=2048, answer=LONG_ANSWER, endless=True)
    return base


@pytest.fixture(scope="module")
def server(long_dir):
    srv = ServerProcess(long_dir, "--max-batch", "2")
    yield srv
    srv.close()


def stats(server) -> dict:
    return httpx.get(server.url + "/stats", timeout=5).json()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def raw_request(server, body: dict) -> socket.socket:
    """Send a chat request on a bare socket, so the test decides exactly when the client goes away."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def long_body(**fields) -> dict:
    return {"messages": GO, "temperature": 0, **fields}


@pytest.mark.parametrize("mode", ["streaming", "whole", "held back for a stop string", "queued"])
def test_a_client_that_leaves_cancels_its_work(server, mode):
    before = stats(server)["tokens_generated"]
    blockers = []
    if mode == "queued":  # both slots busy, so the leaving request waits in the queue
        blockers = [raw_request(server, long_body()), raw_request(server, long_body())]
        assert wait_for(lambda: stats(server)["slots_in_use"] == 2)
    fields = {"streaming": {"stream": True}, "whole": {}, "queued": {},
              "held back for a stop string": {"stream": True, "stop": ["x" * 2000]}}[mode]
    leaving = raw_request(server, long_body(**fields))
    if mode == "streaming":
        received = b""
        while b"data:" not in received:  # the headers may come alone; each recv is bounded by the socket timeout
            received += leaving.recv(4096)
    elif mode == "queued":
        assert wait_for(lambda: stats(server)["queue_depth"] == 1)
    else:
        assert wait_for(lambda: stats(server)["tokens_generated"] > before + 20)
    leaving.close()
    if mode == "queued":
        assert wait_for(lambda: stats(server)["queue_depth"] == 0, timeout=3)
        assert stats(server)["slots_in_use"] == 2  # the others were not touched
        for sock in blockers:
            sock.close()
    assert wait_for(lambda: stats(server)["slots_in_use"] == 0 and stats(server)["requests_in_flight"] == 0, timeout=3)
    spent = stats(server)["tokens_generated"] - before
    assert spent < (len(blockers) + 1) * 600  # each answer would be 2,042 tokens (the context) had it run on


def test_an_idle_server_uses_no_cpu(server):
    httpx.post(server.url + "/v1/chat/completions", json=long_body(max_tokens=5), timeout=30)

    def cpu_seconds() -> float:
        fields = open(f"/proc/{server.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    start = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - start < 0.1


def read_events(resp) -> list:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_the_request_deadline_ends_answers_with_an_error(long_dir):
    srv = ServerProcess(long_dir, "--request-timeout", "0.5")
    try:
        started = time.monotonic()
        whole = httpx.post(srv.url + "/v1/chat/completions", json=long_body(), timeout=30)
        assert whole.status_code == 504 and "time limit" in whole.json()["error"]["message"]
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long_body(stream=True), timeout=30) as resp:
            events = read_events(resp)
        assert time.monotonic() - started < 10
        assert events[-1] == "[DONE]" and "time limit" in json.loads(events[-2])["error"]["message"]
        finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-2]) if c["choices"]]
        assert set(finishes) == {None}  # never "stop": the answer was cut, the client must know
    finally:
        srv.close()


def test_sigterm_tells_answers_in_flight_and_stops_within_seconds(long_dir):
    srv = ServerProcess(long_dir)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long_body(stream=True), timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        srv.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    srv.proc.wait(timeout=10)
    assert time.monotonic() - started < 5
    assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
    assert srv.proc.returncode == -signal.SIGTERM  # it ends by the signal, as a process without a handler would


def test_a_taken_port_ends_the_server_with_uvicorns_startup_status(long_dir):
    """uvicorn runs beside the engine's thread: when it cannot start, the process must end, not wait on the engine."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(long_dir), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "scripts.chat_service", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == STARTUP_FAILURE and "address already in use" in done.stderr.lower()


def test_a_stream_interval_sends_several_tokens_per_chunk_and_the_same_answer(long_dir):
    srv = ServerProcess(long_dir, "--stream-interval", "400")
    try:
        asked = long_body(max_tokens=60, logprobs=True)
        whole = httpx.post(srv.url + "/v1/chat/completions", json=asked, timeout=30).json()
        before = per_token_count(srv)
        started = time.monotonic()
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**asked, "stream": True}, timeout=30) as resp:
            chunks = [json.loads(e) for e in read_events(resp)[:-1]]
        seconds = time.monotonic() - started
        content = [c["choices"][0] for c in chunks[1:] if c["choices"][0]["delta"].get("content")]
        assert "".join(c["delta"]["content"] for c in content) == whole["choices"][0]["message"]["content"]
        assert [e["token"] for c in content for e in c["logprobs"]["content"]] == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
        assert len(content) <= 2 + seconds / 0.4 < whole["usage"]["completion_tokens"]  # the first token, then one chunk per interval
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
        assert per_token_count(srv) - before == whole["usage"]["completion_tokens"] - 1  # one histogram entry per token still
    finally:
        srv.close()


def test_streams_share_the_chunk_rate(long_dir):
    srv = ServerProcess(long_dir, "--stream-interval", "0", "--stream-chunk-rate", "10")
    try:
        asked = long_body(max_tokens=60)
        whole = httpx.post(srv.url + "/v1/chat/completions", json=asked, timeout=30).json()["choices"][0]["message"]["content"]

        def stream(_):
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**asked, "stream": True}, timeout=60) as resp:
                chunks = [json.loads(e)["choices"][0] for e in read_events(resp)[:-1]]
            return [c["delta"]["content"] for c in chunks if c["delta"].get("content")]

        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            streams = list(pool.map(stream, range(2)))
        seconds = time.monotonic() - started
        assert ["".join(s) for s in streams] == [whole, whole]
        # without the shared rate, interval 0 sends a chunk per token: 120 of them
        assert sum(map(len, streams)) <= 4 + seconds * 10 < 120
    finally:
        srv.close()


def test_a_queued_stream_takes_no_share_of_the_chunk_rate(long_dir):
    srv = ServerProcess(long_dir, "--max-batch", "1")
    try:
        first = raw_request(srv, long_body(stream=True))
        assert wait_for(lambda: stats(srv)["streams_sending"] == 1)
        queued = raw_request(srv, long_body(stream=True))
        assert wait_for(lambda: stats(srv)["queue_depth"] == 1)
        assert stats(srv)["streams_sending"] == 1  # the queued one sends nothing yet
        first.close()  # leaving frees the slot: the queued stream starts sending
        assert wait_for(lambda: stats(srv)["queue_depth"] == 0 and stats(srv)["streams_sending"] == 1)
        queued.close()
        assert wait_for(lambda: stats(srv)["streams_sending"] == 0 and stats(srv)["requests_in_flight"] == 0)
    finally:
        srv.close()


@pytest.mark.parametrize("flag, value", [("--stream-chunk-rate", "-1"), ("--stream-chunk-rate", "nan"), ("--stream-interval", "nan")])
def test_stream_pacing_flags_refuse_what_is_not_a_rate(flag, value, capsys):
    from scripts.chat_service import parse_args

    with pytest.raises(SystemExit) as refused:
        parse_args([flag, value])
    assert refused.value.code == 2 and f"{flag} must be 0" in capsys.readouterr().err


def per_token_count(srv) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(srv.url + "/metrics", timeout=5).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "nanochat_time_per_output_token_seconds_count")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_answers_503_and_health_says_so(long_dir):
    tokenizer = Tokenizer.load(long_dir / "tokenizer")

    def rule(ids):
        if ids.size(1) == 1:  # the first decode step kills the worker thread
            raise Crash()

    engine = Engine(Faulty(random_model(tokenizer.get_vocab_size()), rule), tokenizer, max_batch=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerSettings(), {}), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: server.started)
        first = httpx.post(url + "/v1/chat/completions", json=long_body(max_tokens=5), timeout=10)
        assert first.status_code == 503 and "Crash" in first.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "Crash" in health.json()["error"]
        started = time.monotonic()
        again = httpx.post(url + "/v1/chat/completions", json=long_body(max_tokens=5), timeout=10)
        assert again.status_code == 503 and time.monotonic() - started < 2
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_an_unexpected_error_is_a_500_object_and_counted(long_dir):
    tokenizer = Tokenizer.load(long_dir / "tokenizer")
    app = create_app(Engine(random_model(tokenizer.get_vocab_size()), tokenizer), ServerSettings(), {})

    @app.get("/broken")  # a bug in a route, as no client mistake can cause one
    async def broken():
        raise RuntimeError("a bug")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: server.started)
        reply = httpx.get(url + "/broken", timeout=10)
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'nanochat_http_responses_total{route="other",status="500"} 1.0' in metrics
    finally:
        server.should_exit = True
        thread.join(timeout=10)
