"""Serving throughput: aggregate tokens/s for 1, 4 and 8 concurrent streaming clients.

    ./chat_service.sh &                    # any running server
    python bench/serve.py --url http://localhost:8000
    python bench/serve.py --spawn          # start scripts.chat_service on a free port for the run

Each client streams one answer of up to --max-tokens (usage from
stream_options.include_usage counts the real tokens). The ratio 8-vs-1 shows
what continuous batching buys (target: >= 4x).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time

import httpx
from openai import OpenAI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://localhost:8000", help="server to measure (default %(default)s)")
    p.add_argument("--spawn", action="store_true", help="start `python -m scripts.chat_service` on a free port instead")
    p.add_argument("--source", default="auto", help="model source for --spawn (default %(default)s)")
    p.add_argument("--api-key", default="none", help="bearer key, if the server wants one")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default %(default)s)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels (default 1 4 8)")
    return p.parse_args(argv)


def spawn(source: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_service", "--host", "127.0.0.1", "--port", str(port),
                             "--source", source, "--max-batch", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the spawned server did not start")


def one_answer(client: OpenAI, i: int, max_tokens: int, counts: list) -> None:
    stream = client.chat.completions.create(
        model="nanochat", messages=[{"role": "user", "content": f"Tell me a long story about the number {i}."}],
        temperature=1.0, seed=i, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            counts[i] = chunk.usage.completion_tokens


def measure(client: OpenAI, clients: int, max_tokens: int) -> tuple[int, float]:
    counts = [0] * clients
    threads = [threading.Thread(target=one_answer, args=(client, i, max_tokens, counts)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    proc, url = spawn(args.source) if args.spawn else (None, args.url)
    try:
        client = OpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0)
        measure(client, 1, 8)  # warm-up
        print(f"server {url}, up to {args.max_tokens} tokens per answer")
        print("| clients | tokens | seconds | aggregate tokens/s |")
        print("|---|---|---|---|")
        rates = {}
        for n in args.clients:
            tokens, seconds = measure(client, n, args.max_tokens)
            rates[n] = tokens / seconds
            print(f"| {n} | {tokens:,} | {seconds:.2f} | {rates[n]:,.0f} |")
        if 1 in rates and 8 in rates:
            print(f"8 clients vs 1: {rates[8] / rates[1]:.2f}x (target >= 4x)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
