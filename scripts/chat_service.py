"""Serve a model: the OpenAI-compatible API and the chat web page, one server.

    python -m scripts.chat_service                    # http://localhost:8000
    python -m scripts.chat_service --api-key secret   # bearer auth on /v1 and /stats

chat.sh and chat_service.sh call this; their flags are these.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

import uvicorn

from nanochat.checkpoint import CheckpointError, load_model
from nanochat.flags import add_model_args, device_and_dtype, warm_up
from nanochat.engine import Engine, EngineWorker
from nanochat.flags import FlagParser
from serving.http_guard import guarded_protocol
from serving.server import ServerSettings, create_app
from nanochat.tokenizer import TokenizerError, get_tokenizer

KEEP_ALIVE_SECONDS = 5  # a connection with no request in progress is closed after this, so idle clients cannot hold --max-connections
SHUTDOWN_GRACE_SECONDS = 3  # after SIGTERM / Ctrl-C, how long answers in flight get to end before they are cut


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_service", description="Serve a model over an OpenAI-compatible API and a web page.")
    add_model_args(p, temperature=ServerSettings.temperature, max_tokens=ServerSettings.max_tokens)  # sampling flags are defaults here; requests override them
    p.add_argument("-p", "--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default %(default)s: all)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"), help="require 'Authorization: Bearer KEY' (env NANOCHAT_API_KEY); none: open")
    p.add_argument("--cors", nargs="*", default=[], metavar="ORIGIN", help="allow browser clients from these origins ('*' for any)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=ServerSettings.max_queue, help="waiting requests before new ones get 429 (default %(default)s)")
    p.add_argument("--max-messages", type=int, default=ServerSettings.max_messages, help="messages per request (default %(default)s)")
    p.add_argument("--max-message-chars", type=int, default=ServerSettings.max_message_chars, help="characters per message (default %(default)s)")
    p.add_argument("--max-total-chars", type=int, default=ServerSettings.max_total_chars, help="characters per request (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=ServerSettings.request_timeout, help="seconds a request may take, queueing included (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=ServerSettings.body_timeout, help="seconds a request body may take to arrive before 408 (default %(default)s)")
    p.add_argument("--stream-interval", type=float, default=ServerSettings.stream_interval * 1000, metavar="MS",
                   help="a stream sends at most one chunk per MS milliseconds, with every token since the last "
                        "(the first token and the end at once); fewer, larger chunks cost the server and client less; 0 (with --stream-chunk-rate 0): one per token (default %(default)g)")
    p.add_argument("--stream-chunk-rate", type=float, default=ServerSettings.stream_chunk_rate, metavar="N",
                   help="all streams together send at most N chunks a second (each stream still at most one per "
                        "--stream-interval), so many streams wait longer between chunks instead of spending the CPU on them; "
                        "0: no limit (default %(default)g)")
    p.add_argument("--max-connections", type=int, default=256, help="connections served at once; one more gets 503 (default %(default)s)")
    p.add_argument("--banner", default="api", choices=["api", "web"], help="what the startup message explains (chat.sh uses web)")
    args = p.parse_args(argv)
    if not args.stream_interval >= 0:  # NaN too
        p.error(f"--stream-interval must be 0 or more milliseconds, not {args.stream_interval:g}")
    if not args.stream_chunk_rate >= 0:
        p.error(f"--stream-chunk-rate must be 0 (no limit) or more chunks a second, not {args.stream_chunk_rate:g}")
    return args


def urls(host: str, port: int) -> list[str]:
    """Addresses a browser can open: localhost, and this machine's LAN address when listening on all interfaces."""
    found = [f"http://localhost:{port}"]
    if host in ("0.0.0.0", "::"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("10.255.255.255", 1))  # no packet is sent; this picks the outgoing interface
                found.append(f"http://{s.getsockname()[0]}:{port}")
        except OSError:
            pass
    elif host not in ("127.0.0.1", "localhost"):
        found = [f"http://{host}:{port}"]
    return found


def banner(args, meta: dict, device) -> str:
    lines = [f"nanochat: {meta['source']} model {meta['model_tag']} step {meta['step']:,} on {device}"]
    addresses = urls(args.host, args.port)
    if args.banner == "web":
        lines += ["open in your browser:"] + [f"  {u}" for u in addresses]
    else:
        lines += [f"OpenAI-compatible API: {addresses[0]}/v1  (model id 'nanochat')"]
    lines.append("auth: bearer API key required" if args.api_key else "auth: none (anyone who can reach this port can use it; --api-key to require a key)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.device, args.dtype)
    try:
        tokenizer = get_tokenizer()
        model, meta = load_model(args.source, args.model_tag, args.step, device=device, dtype=dtype)
    except (CheckpointError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(model, tokenizer, max_batch=args.max_batch, compile=args.compile)
    warm_up(engine)
    settings = ServerSettings(
        api_key=args.api_key or None, cors_origins=args.cors, max_messages=args.max_messages,
        max_message_chars=args.max_message_chars, max_total_chars=args.max_total_chars, max_queue=args.max_queue,
        temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, request_timeout=args.request_timeout,
        body_timeout=args.body_timeout, stream_interval=args.stream_interval / 1000,
        stream_chunk_rate=args.stream_chunk_rate,
    )
    info = {"source": meta["source"], "model_tag": meta["model_tag"], "step": meta["step"],
            "parameters": model.num_params(), "device": str(device), "context": engine.max_len}
    worker = EngineWorker(engine)
    app = create_app(engine, settings, info, worker)
    print(banner(args, meta, device), flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            http=guarded_protocol(args.max_connections, KEEP_ALIVE_SECONDS),
                            timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    return serve(Server(config, engine), worker)


def serve(server: Server, worker: EngineWorker) -> int:
    """uvicorn in a thread, the engine's steps in this one: the thread that loaded and warmed up the model
    (EngineWorker says why). Signals arrive here and go to uvicorn; however uvicorn ends, the engine is
    closed and the steps end with it. Returns uvicorn's status when it could not start (3: the port is
    taken, say), as before it ran in a thread; after a signal, the process ends by that signal, as it would have without a handler."""
    failed = []  # uvicorn's exit status when it could not start
    caught = []

    def http() -> None:
        try:
            server.run()
        except SystemExit as exc:  # how uvicorn reports that it could not start, in its own thread too
            failed.append(exc.code)
        finally:
            if worker.engine.closed is None:
                worker.engine.close(503, "the server is shutting down")

    def on_signal(sig, frame) -> None:
        caught.append(sig)
        server.handle_exit(sig, frame)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="http")
    thread.start()
    try:
        worker.run()
    finally:  # a dead engine leaves the server answering 503 (and /health saying why) until it is stopped
        thread.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if caught:
        signal.signal(caught[0], signal.SIG_DFL)
        signal.raise_signal(caught[0])
    return failed[0] if failed else 0


class Server(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM / Ctrl-C tells every request in flight that the server is going away
    (an error object, or an error event and [DONE]) instead of waiting for the answers to finish."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        # from another thread: a signal handler must not wait for the engine's lock, which the interrupted code may hold
        threading.Thread(target=self.engine.close, args=(503, "the server is shutting down"), daemon=True).start()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
