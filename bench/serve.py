"""Serving under load: our chat_service against `transformers serve --continuous-batching`, same model, same run.

    python bench/serve.py                  # a fresh random depth-4 model (vocab 8,192), both servers
    python bench/serve.py --source base    # a checkpoint from $NANOCHAT_BASE_DIR instead
    python bench/serve.py --smoke          # seconds: a tiny model, 1 and 2 clients, 8 tokens

The run, in order, never two of these busy at once:
  1. the model: a fresh random one (written to a temp folder as our checkpoint
     layout and as a HuggingFace export with our chat template), or --source's
     checkpoint, exported the same way;
  2. the Engine as the server runs it, in this process, one row, its compiled
     step warmed up;
  3. ours: `python -m scripts.chat_service` on a free 127.0.0.1 port; each
     --clients level, then 16 clients again while one more client sends
     malformed requests (bad JSON, wrong types) in a loop, then --engine-repeats
     turns of one in-process Engine answer and one streamed answer on the first
     prompt; then stopped;
  4. theirs: `transformers serve <export> --continuous-batching`, the same levels.
Servers are subprocesses, killed on the way out whatever happened.

Each client is a thread with the real `openai` client streaming chat
completions; --requests rounds, in each of which every level in turn has each
of its clients stream one answer (levels measured one after the other would
compare different speeds of this VM). Both servers get the same
prompts and greedy decoding (temperature 0) for --max-tokens tokens; tokens
are what each server reports in `usage`. Each server streams as it does by
default: ours one chunk per 20 ms per stream and at most 100 a second for all
streams together (chat_service --stream-interval, --stream-chunk-rate; this
script's --stream-interval 0 --stream-chunk-rate 0 for one per token),
transformers serve one per token. The fresh model's lm_head rows for the special tokens are zero, so no
stop token ever wins the argmax and every answer runs to --max-tokens; a line
warns when an answer came back shorter.

Per level: aggregate tokens/s (all tokens / wall time), time to first token
(request sent -> first non-empty content chunk) p50 and p95 (nearest rank).
Our one-stream decode rate is (tokens - 2) / (first to last content chunk) of
a streamed answer, beside the in-process Engine's decode rate on the same
prompt and length, the two taken in turns (medians).

Targets from the issue "Benchmarks that run their rival in the same run":
8 clients >= 4x one client; ours >= 2x transformers serve at 8 clients; one
stream >= 90% of the Engine's batch-1 decode rate; the garbage client moves
p95 time to first token by at most 10%. This script only measures them.

Why one file of over 500 lines: a bench is one runnable file; what the benches share
is in bench/rivals.py.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rivals import machine_line, synthetic_tokenizer  # noqa: E402
from nanochat.checkpoint import load_model, save_checkpoint  # noqa: E402
from nanochat.common import DTYPES, add_device_arg, autodetect_device_type, compute_dtype  # noqa: E402
from nanochat.conversation import SPECIAL_TOKENS  # noqa: E402
from nanochat.engine import Engine, collect  # noqa: E402
from nanochat.gpt import GPT, build_model, config_for_depth  # noqa: E402
from sharing.hf_export import CHAT_TEMPLATE, export_hf  # noqa: E402
from nanochat.sampling import SamplingParams  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402

RANDOM_TAG = "bench"  # model tag of the fresh model in the temp checkpoint folder
HF_PAGE_TOKENS = 256  # transformers' default continuous-batching page size (ContinuousBatchingConfig.page_size)
GARBAGE_LEVEL = 16  # clients in the garbage run, as the issue asks; capped by the largest --clients level

# What the garbage client sends, in turn: each must come back 4xx and leave the server serving.
BAD_BODIES = (
    b'{"messages": [',  # cut off mid-JSON
    b"this is not json",
    b"[1, 2, 3]",  # JSON, but not an object
    b'{"messages": "hello"}',
    b'{"messages": [{"role": "user", "content": 42}]}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -3}',
    b"\xff\xfe\x00garbage",  # not even UTF-8
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"], help="serve this stage's newest checkpoint from $NANOCHAT_BASE_DIR (default: a fresh random model)")
    p.add_argument("--depth", type=int, default=4, help="depth of the fresh model (default %(default)s: the CPU reference config)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the fresh model (default %(default)s)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrency levels (default 1 4 8 16)")
    p.add_argument("--requests", type=int, default=4, help="rounds; in each, every --clients level in turn has each client stream one answer (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=None, help="sequences our server decodes together, and full-context sequences the rival's cache holds (default: the largest --clients level)")
    p.add_argument("--engine-repeats", type=int, default=3, help="turns of one in-process Engine answer then one HTTP stream, for the one-stream ratio; medians kept (default %(default)s)")
    add_device_arg(p, help_text="device for both servers and the Engine (default: autodetect)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="weights and compute dtype for both (default: bfloat16 on a GPU that runs it natively, float32 elsewhere)")
    p.add_argument("--startup-timeout", type=float, default=900,
                   help="seconds a server may take to load (and compile) and answer its first request (default %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="our server and in-process Engine decode through the compiled step (chat_service --compile; "
                        "default: on, off for --smoke, where compiling would take minutes)")
    p.add_argument("--stream-interval", type=float, default=None, metavar="MS",
                   help="our server's chat_service --stream-interval (default: the server's own, 20 ms; 0 with --stream-chunk-rate 0 sends a chunk per token as the rival does)")
    p.add_argument("--stream-chunk-rate", type=float, default=None, metavar="N",
                   help="our server's chat_service --stream-chunk-rate, chunks a second for all streams together (default: the server's own, 100; 0 with --stream-interval 0 sends a chunk per token as the rival does)")
    p.add_argument("--no-rival", action="store_true", help="measure ours only")
    p.add_argument("--smoke", action="store_true", help="seconds-long run of every code path: depth 1, vocab 512, 1 and 2 clients, 8 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.vocab_size, args.clients, args.requests, args.max_tokens, args.engine_repeats = 1, 512, [1, 2], 1, 8, 1
    if args.compile is None:
        args.compile = not args.smoke
    args.clients = sorted(set(args.clients))
    args.max_batch = args.max_batch or args.clients[-1]
    return args


# ---------------------------------------------------------------- the model


@dataclass
class Prepared:
    """One model, in the three forms the run needs."""

    model: GPT  # on the CPU, as loaded or made
    tokenizer: Tokenizer
    what: str
    base_dir: Path  # $NANOCHAT_BASE_DIR for our server
    source: str  # --source for our server
    hf_dir: Path  # the export transformers serve loads


def random_model(depth: int, tokenizer: Tokenizer) -> GPT:
    """A fresh model whose special tokens can never be the argmax, so greedy answers never stop early:
    their lm_head rows are zero (logit 0) while the best of the other ~vocab random logits is well above 0."""
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, tokenizer.get_vocab_size()), "cpu").eval()
    special = [tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    with torch.no_grad():
        model.lm_head.weight[special] = 0.0
    return model


def prepare(args, workdir: Path) -> Prepared:
    if args.source:
        from nanochat.common import get_base_dir
        from nanochat.tokenizer import get_tokenizer

        model, meta = load_model(args.source, device="cpu")
        tokenizer, base_dir, source = get_tokenizer(), get_base_dir(), args.source
        what = f"{meta['source']} model {meta['model_tag']} step {meta['step']:,}"
    else:
        tokenizer = synthetic_tokenizer(args.vocab_size)
        model = random_model(args.depth, tokenizer)
        base_dir, source = workdir / "base", "base"
        tokenizer.save(base_dir / "tokenizer")
        save_checkpoint(base_dir / "base_checkpoints" / RANDOM_TAG, 0, model_state=model.state_dict(), optim_state=None,
                        data_state=None, meta={"model_config": model.config.to_dict()})
        what = f"fresh random depth-{args.depth} model (special tokens' lm_head rows zeroed)"
    # the rival answers /v1/chat/completions only with a chat template; ours renders the same ids
    hf_dir = export_hf(model, tokenizer, workdir / "hf", chat_template=CHAT_TEMPLATE)
    return Prepared(model, tokenizer, what, base_dir, source, hf_dir)


def prompt_text(i: int) -> str:
    return f"Tell me a long story about the number {i}."


# ---------------------------------------------------------------- servers


class ServerFailed(RuntimeError):
    """A server that exited or never became healthy; the message ends with its log's last line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = 1) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " / ".join(line.strip() for line in text[-lines:]) or "no output"


@contextlib.contextmanager
def spawned(command: list[str], port: int, env: dict, log: Path, timeout: float):
    """Start a server, wait for GET /health to say 200, yield its URL; kill it on the way out."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, log, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"exited with status {proc.returncode}: {log_tail(log, 3)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerFailed(f"not healthy after {timeout:.0f} s: {log_tail(log)}")


def our_command(args, port: int, source: str, dtype: str, device: str) -> list[str]:
    return [sys.executable, "-m", "scripts.chat_service", "--host", "127.0.0.1", "--port", str(port), "--source", source,
            "--max-batch", str(args.max_batch), "--dtype", dtype, "--device", device] + (["--compile"] if args.compile else []) + \
           ([] if args.stream_interval is None else ["--stream-interval", f"{args.stream_interval:g}"]) + \
           ([] if args.stream_chunk_rate is None else ["--stream-chunk-rate", f"{args.stream_chunk_rate:g}"])


def rival_command(args, port: int, hf_dir: Path, context: int, dtype: str, device: str) -> list[str]:
    """transformers serve pinned to our export. It has no flag capping requests per batch; the nearest
    is its cache size, set to hold --max-batch full-context sequences as our slot cache does."""
    blocks = args.max_batch * math.ceil(context / HF_PAGE_TOKENS)
    return [rival_executable(), "serve", str(hf_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
            "--device", device, "--dtype", dtype, "--cb-num-blocks", str(blocks)]


def rival_executable() -> str:
    """The `transformers` console script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "transformers"
    return str(beside) if beside.exists() else (shutil.which("transformers") or "transformers")


def rival_missing() -> str | None:
    """Why transformers serve cannot run here, or None. Checked up front so the run can still measure ours."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:
        return f"transformers is not installed: {exc}"
    if not is_serve_available():
        return "transformers serve needs fastapi, uvicorn, pydantic and openai: pip install 'transformers[serving]'"
    if not (Path(sys.executable).parent / "transformers").exists() and shutil.which("transformers") is None:
        return "no `transformers` command in this environment"
    return None


def server_env(base_dir: Path) -> dict:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("NANOCHAT_API_KEY", None)  # the bench talks without a key
    env["HF_HUB_OFFLINE"] = "1"  # the export is local; never wait on the network
    return env


# ---------------------------------------------------------------- clients


@dataclass
class Answer:
    sent: float
    first: float | None  # arrival of the first non-empty content chunk
    last: float | None  # arrival of the last one
    tokens: int
    from_usage: bool  # False: the server sent no usage, the streamed text was re-encoded with our tokenizer

    @property
    def ttft(self) -> float:
        return (self.first if self.first is not None else self.last or self.sent) - self.sent


@dataclass
class Level:
    clients: int
    answers: list[Answer]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, pct: float) -> float:
        return percentile([a.ttft for a in self.answers], pct)


def percentile(values: list[float], pct: float) -> float:
    """Nearest rank: the smallest value with at least pct% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def stream_answer(client: OpenAI, model_id: str, prompt: str, max_tokens: int, tokenizer: Tokenizer) -> Answer:
    sent, first, last, text, tokens = time.perf_counter(), None, None, "", None
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                first, last, text = first or now, now, text + choice.delta.content
    if tokens is None:
        return Answer(sent, first, last, len(tokenizer.encode(text)), from_usage=False)
    return Answer(sent, first, last, tokens, from_usage=True)


def run_level(client: OpenAI, model_id: str, clients: int, requests: int, max_tokens: int, tokenizer: Tokenizer,
              first_prompt: int = 0) -> Level:
    """`clients` threads, each streaming `requests` answers back to back; client c asks prompts
    first_prompt + c*requests..."""

    def one_client(c: int) -> list[Answer]:
        return [stream_answer(client, model_id, prompt_text(first_prompt + c * requests + r), max_tokens, tokenizer)
                for r in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        per_client = list(pool.map(one_client, range(clients)))  # re-raises a client's error here
    return Level(clients, [a for answers in per_client for a in answers], time.perf_counter() - t0)


def warm_up(client: OpenAI, model_id: str, clients: int, tokenizer: Tokenizer) -> None:
    """One answer alone (the rival builds its batching state on the first request, with that request's
    sampling settings: greedy, as all later ones), then one at full concurrency."""
    run_level(client, model_id, 1, 1, 8, tokenizer)
    run_level(client, model_id, clients, 1, 8, tokenizer)


def openai_client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


def measure_levels(client: OpenAI, model_id: str, args, tokenizer: Tokenizer) -> dict[int, Level]:
    """--requests rounds of one answer per client at every level in turn, each level's rounds summed:
    this VM's speed drifts within seconds, so levels measured one after the other compared different
    speeds (8 clients / 1 came out 1.98x to 3.82x in three runs of the same code)."""
    rounds = [{n: run_level(client, model_id, n, 1, args.max_tokens, tokenizer, first_prompt=r * n) for n in args.clients}
              for r in range(args.requests)]
    return {n: Level(n, [a for got in rounds for a in got[n].answers], sum(got[n].seconds for got in rounds)) for n in args.clients}


# ---------------------------------------------------------------- the garbage client


def garbage_loop(url: str, stop, results) -> None:
    """Send BAD_BODIES in turn, one at a time, until told to stop; report (sent, statuses seen).
    Runs in its own process so its work does not hold the GIL of the threads timing the real clients."""
    statuses: dict[str, int] = {}
    sent = 0
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            body = BAD_BODIES[sent % len(BAD_BODIES)]
            try:
                status = str(http.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1
    results.put((sent, statuses))


def garbage_level(url: str, client: OpenAI, args, tokenizer: Tokenizer, clients: int) -> tuple[Level, int, dict[str, int]]:
    """A level of `clients` real clients while the garbage client runs beside them."""
    ctx = multiprocessing.get_context("fork")  # the child only needs httpx; fork skips re-importing torch
    stop, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=garbage_loop, args=(url, stop, results), daemon=True)
    proc.start()
    try:
        time.sleep(0.5)  # let it reach its loop before the clients start
        level = run_level(client, "nanochat", clients, args.requests, args.max_tokens, tokenizer)
    finally:
        stop.set()
    sent, statuses = results.get(timeout=60)
    proc.join(timeout=10)
    return level, sent, statuses


# ---------------------------------------------------------------- the engine in-process


def in_process_engine(model: GPT, tokenizer: Tokenizer, compile: bool) -> Engine:
    """The Engine as the server runs it (its compiled step warmed up), one row, in this process."""
    engine = Engine(model, tokenizer, max_batch=1, compile=compile)
    engine.warm_up()
    return engine


def engine_run(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """Decode tokens/s of one greedy answer after its first step (the prefill), and its tokens."""
    request = engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    engine.step()  # the prefill samples the first token, and the same step already decodes the second
    first, first_tokens = time.perf_counter(), request.completion_tokens
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - first
    tokens = len(collect(request)[0].tokens)
    return ((tokens - first_tokens) / seconds if seconds > 0 else float("nan")), tokens


@dataclass
class DecodePairs:
    """One stream over HTTP against the in-process Engine, taken in turns on the same prompt and length."""

    engine: list[float]
    served: list[float]
    engine_tokens: int


def decode_pairs(engine: Engine, client: OpenAI, args, tokenizer: Tokenizer) -> DecodePairs:
    """--engine-repeats rounds of one in-process answer, then one streamed from the server (which is idle
    while the Engine runs, and the Engine while it serves): this VM's speed drifts over minutes, so rates
    taken apart would compare two machines. A first round warms both up and is not counted."""
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt_text(0)}]})
    pairs, tokens = DecodePairs([], [], 0), 0
    for i in range(args.engine_repeats + 1):
        rate, tokens = engine_run(engine, prompt, args.max_tokens)
        answer = stream_answer(client, "nanochat", prompt_text(0), args.max_tokens, tokenizer)
        if i:
            pairs.engine.append(rate)
            pairs.served.append(stream_decode_rate([answer]))
    pairs.engine_tokens = tokens
    return pairs


def as_served(model: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    """The model as chat_service holds it (load_model with a dtype): weights and compute in dtype."""
    model = model.to(device=device, dtype=dtype)
    model.compute_dtype = dtype
    return model.eval()


def stream_decode_rate(answers: list[Answer]) -> float:
    """(tokens - 2) / (first to last content chunk), over answers: the Engine's first step yields two tokens
    (the prefill's sample, then a decode), whose chunks leave together, so the time from the first chunk
    covers tokens - 2 decode steps, as engine_run counts them."""
    timed = [a for a in answers if a.first is not None and a.last > a.first]
    return sum(a.tokens - 2 for a in timed) / sum(a.last - a.first for a in timed) if timed else float("nan")


# ---------------------------------------------------------------- the report


def print_rows(name: str, levels: dict[int, Level]) -> None:
    for n, level in levels.items():
        print(f"| {name} | {n} | {len(level.answers)} | {level.tokens:,} | {level.seconds:.2f} | {level.rate:,.0f} "
              f"| {level.ttft(50) * 1000:,.0f} | {level.ttft(95) * 1000:,.0f} |")


def print_table(ours: dict[int, Level], theirs: dict[int, Level] | None) -> None:
    print("| server | clients | answers | tokens | seconds | aggregate tokens/s | TTFT p50 ms | TTFT p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    print_rows("ours", ours)
    if theirs:
        print_rows("transformers", theirs)


def print_ratios(ours: dict[int, Level], theirs: dict[int, Level] | None) -> None:
    if theirs:
        for n in ours:
            print(f"ours / transformers at {n} client{'s' if n > 1 else ''}: {ours[n].rate / theirs[n].rate:.2f}x tokens/s, "
                  f"{ours[n].ttft(95) / theirs[n].ttft(95):.2f}x p95 TTFT")
    for name, levels in (("ours", ours), ("transformers", theirs or {})):
        if 1 in levels and 8 in levels:
            print(f"{name} 8 clients / 1 client: {levels[8].rate / levels[1].rate:.2f}x tokens/s")


def warn_short(name: str, levels: list[Level], max_tokens: int) -> None:
    answers = [a for level in levels for a in level.answers]
    short = sum(a.tokens != max_tokens for a in answers)
    if short:
        print(f"warning: {name}: {short} of {len(answers)} answers did not report exactly {max_tokens} tokens; "
              "the servers did unequal work")
    if not all(a.from_usage for a in answers):
        print(f"note: {name} sent no usage in some streams; their tokens were counted by re-encoding the text with our tokenizer")


def print_garbage(clean: Level, dirty: Level, sent: int, statuses: dict[str, int]) -> None:
    before, after = clean.ttft(95), dirty.ttft(95)
    seen = ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    print(f"garbage: p95 TTFT at {clean.clients} clients {before * 1000:,.0f} ms without, {after * 1000:,.0f} ms with "
          f"one client sending malformed requests in a loop ({(after - before) / before * 100:+.1f}%); "
          f"{dirty.rate:,.0f} vs {clean.rate:,.0f} tokens/s; it sent {sent:,} requests, answered {seen}")


def print_decode(pairs: DecodePairs, max_tokens: int) -> None:
    served, engine = statistics.median(pairs.served), statistics.median(pairs.engine)
    print(f"one stream: ours decodes {served:,.0f} tokens/s over HTTP, the Engine in-process {engine:,.0f} tokens/s "
          f"at batch 1 on the same prompt and length, medians of {len(pairs.served)} turns each ({served / engine * 100:.0f}%)")
    if pairs.engine_tokens != max_tokens:
        print(f"warning: the in-process Engine produced {pairs.engine_tokens} tokens, not {max_tokens}")


# ---------------------------------------------------------------- the run


def run_ours(args, prepared: Prepared, engine: Engine, dtype: str, device: str, workdir: Path):
    port = free_port()
    command = our_command(args, port, prepared.source, dtype, device)
    print("ours: python " + " ".join(command[1:]))
    with spawned(command, port, server_env(prepared.base_dir), workdir / "ours.log", args.startup_timeout) as url:
        client = openai_client(url)
        warm_up(client, "nanochat", args.clients[-1], prepared.tokenizer)
        levels = measure_levels(client, "nanochat", args, prepared.tokenizer)
        busy = min(GARBAGE_LEVEL, args.clients[-1])
        clean = levels.get(busy) or run_level(client, "nanochat", busy, args.requests, args.max_tokens, prepared.tokenizer)
        garbage = garbage_level(url, client, args, prepared.tokenizer, busy)
        pairs = decode_pairs(engine, client, args, prepared.tokenizer)
    return levels, clean, garbage, pairs


def run_theirs(args, prepared: Prepared, dtype: str, device: str, workdir: Path) -> dict[int, Level] | str:
    """The rival's levels, or why it could not run."""
    missing = rival_missing()
    if missing:
        return missing
    port = free_port()
    command = rival_command(args, port, prepared.hf_dir, prepared.model.config.sequence_len, dtype, device)
    print("transformers: " + " ".join(["transformers", *command[1:]]))
    try:
        with spawned(command, port, server_env(prepared.base_dir), workdir / "theirs.log", args.startup_timeout) as url:
            client = openai_client(url)
            model_id = str(prepared.hf_dir)  # the server is pinned to this model and refuses any other name
            try:
                warm_up(client, model_id, args.clients[-1], prepared.tokenizer)
                return measure_levels(client, model_id, args, prepared.tokenizer)
            except Exception as exc:  # the openai client's errors and the network's share no base class
                raise ServerFailed(f"failed answering: {type(exc).__name__}: {exc}; log: {log_tail(workdir / 'theirs.log')}") from None
    except (ServerFailed, OSError) as exc:
        return f"transformers serve {exc}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(autodetect_device_type(args.device))
    dtype = compute_dtype(device.type, args.dtype)
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    print(machine_line(device), flush=True)
    # other processes on the same cores skew every figure, the rival's batching most of all
    print(f"load average before the run: {os.getloadavg()[0]:.2f} (1 minute)")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        workdir = Path(tmp)
        prepared = prepare(args, workdir)
        prompt = prepared.tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt_text(0)}]})
        print(f"model: {prepared.what}, {prepared.model.num_params():,} parameters, vocab {prepared.tokenizer.get_vocab_size():,}, "
              f"{dtype_name} on {device}; prompts ~{len(prompt)} tokens, greedy, {args.max_tokens} tokens per answer, "
              f"{args.requests} answer(s) per client per level", flush=True)
        served_model = as_served(prepared.model, device, dtype)
        engine = in_process_engine(served_model, prepared.tokenizer, args.compile)
        ours, clean, (dirty, sent, statuses), pairs = run_ours(args, prepared, engine, dtype_name, device.type, workdir)
        del engine
        served_model.to(device="cpu")  # in place: the GPU's memory is the rival's from here
        theirs = None if args.no_rival else run_theirs(args, prepared, dtype_name, device.type, workdir)
    rival = theirs if isinstance(theirs, dict) else None
    if isinstance(theirs, str):
        print(f"rival: unavailable ({theirs})")
    print_table(ours, rival)
    print_ratios(ours, rival)
    warn_short("ours", [*ours.values(), clean, dirty], args.max_tokens)
    if rival:
        warn_short("transformers", list(rival.values()), args.max_tokens)
    print_decode(pairs, args.max_tokens)
    print_garbage(clean, dirty, sent, statuses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
