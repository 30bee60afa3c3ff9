"""Helpers for the serving tests: a tiny real model trained to say specific things, and a real server process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from two_ranks import free_port  # noqa: F401 (the serving tests' port, from here)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ANSWER = "<script>alert('pwned')</script> **bold** and `code`"
FENCED_ANSWER = "Run this:\n\n```python\nprint('hi')\n```\n\nDone."


def make_served_model(base: Path, sequence_len: int = 1024, answer: str = SCRIPT_ANSWER, endless: bool = False) -> tuple[GPT, Tokenizer]:
    """Tokenizer + an SFT checkpoint of a tiny model overfit to answer 'hi' with `answer` (returned too); an `endless` one
    never learns the end of the answer, so it goes on until max_tokens or its context.
    Trained on one thread: on 2 busy cores, two threads took 90 s where one took 7 s (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_served_model(base, sequence_len, answer, endless)
    finally:
        torch.set_num_threads(threads)


def _train_served_model(base: Path, sequence_len: int, answer: str, endless: bool) -> tuple[GPT, Tokenizer]:
    words = ["hello", "world", "script", "alert", "bold", "code", "and", "the", "answer", "is"]
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) + " <script> **x** `y`" for i in range(200)]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=300)
    tokenizer.save(base / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    model = build_model(config, "cpu")
    ids, _ = tokenizer.render_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]})
    if endless:  # where a long answer ends is a guess for so small a model, and it guessed differently on another CPU
        assert ids[-1] == tokenizer.encode_special("<|assistant_end|>"), "the rendered answer no longer ends with its end token"
        ids = ids[:-1]  # no <|assistant_end|> target: greedy decoding never picks it
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(base / "chatsft_checkpoints" / "tiny", 200, model_state=model.state_dict(), optim_state=None,
                    data_state=None, meta={"model_config": config.to_dict()})
    return model.eval(), tokenizer


class ServerProcess:
    """`python -m scripts.chat_service` on a free port, until close(). Its output goes to a file, not a
    pipe: nobody drains a pipe while the server runs, and a full one would stall it mid-write."""

    def __init__(self, base: Path, *args: str, startup_timeout: float = 90):
        self.port = free_port()
        self.url, self.address = f"http://127.0.0.1:{self.port}", ("127.0.0.1", self.port)
        self.log_path = Path(tempfile.mkstemp(prefix="chat_service_", suffix=".log")[1])
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("NANOCHAT_API_KEY", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.chat_service", "--host", "127.0.0.1", "--port", str(self.port), *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError("server did not become healthy:\n" + self.log())

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log(self, start: int = 0) -> str:
        return self.log_path.read_bytes()[start:].decode(errors="replace")

    def close(self) -> str:
        """Stop the server; everything it printed."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.log()
        self.log_path.unlink(missing_ok=True)
        return out


def make_slow_model(base: Path) -> None:
    """Tokenizer + a base checkpoint of a random model big enough to decode slowly (a few dozen tokens/s on one
    thread), so a browser can watch tokens arrive and stop an answer midway."""
    make_served_model(base)  # for the tokenizer
    tokenizer = Tokenizer.load(base / "tokenizer")
    torch.manual_seed(1)
    config = GPTConfig(sequence_len=2048, vocab_size=tokenizer.get_vocab_size(), n_layer=8, n_head=4, n_kv_head=4, n_embd=512)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(base / "base_checkpoints" / "slow", 1, model_state=model.state_dict(), optim_state=None,
                    data_state=None, meta={"model_config": config.to_dict()})
