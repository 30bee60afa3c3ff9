"""The terminal chat: one-shot prompts, an interactive session, Ctrl-C during an answer."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from served_model import ROOT, SCRIPT_ANSWER, make_slow_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    make_slow_model(base)  # a base model that talks slowly, plus the sft model that answers "hi"
    return base


def _env(base):
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_one_shot_prompt(model_dir):
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "-t", "0"], cwd=ROOT, env=_env(model_dir),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == SCRIPT_ANSWER


def test_interactive_session_clear_and_quit(model_dir):
    session = "hi\nclear\nhi\n\nquit\n"
    out = subprocess.run(["bash", "chat_cli.sh", "-t", "0", "-m", "60"], cwd=ROOT, env=_env(model_dir), input=session,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(SCRIPT_ANSWER) == 2 and "(new conversation)" in out.stdout
    assert "sft tiny step 200" in out.stdout
    eof = subprocess.run([sys.executable, "-m", "scripts.chat_cli"], cwd=ROOT, env=_env(model_dir), input="",
                         capture_output=True, text=True, timeout=120)
    assert eof.returncode == 0  # Ctrl-D leaves


def test_ctrl_c_stops_an_answer_but_not_the_chat(model_dir):
    # A shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: give the child the default, as a terminal would, so the test runs the same from anywhere.
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "-s", "base", "-t", "0", "-m", "1500"], cwd=ROOT,
                            env=_env(model_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write("hello world\n")
    proc.stdin.flush()
    seen = read_until(proc, "Assistant: ", timeout=60)
    seen += read_until(proc, seen + "?????", timeout=10, at_least=5)  # some answer text has streamed
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "[stopped]" in seen + rest


def read_until(proc, marker: str, timeout: float, at_least: int = 0) -> str:
    """Child output until `marker` appears (or `at_least` characters came), failing after `timeout` seconds:
    a hung child fails the test instead of hanging the suite."""
    fd, seen, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while marker.encode() not in seen and not (at_least and len(seen) >= at_least):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no {marker!r} from the child within {timeout} s; it said: {seen.decode(errors='replace')!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"the child closed its output before {marker!r}: {seen.decode(errors='replace')!r}"
        seen += chunk
    return seen.decode(errors="replace")


def test_a_special_token_mid_answer_ends_it_unseen(tmp_path):
    """A model that runs on into the next turn (emits <|user_start|> after its answer): the CLI ends the
    answer there and never prints the token's name."""
    texts = ["hello there, general answer " * 20] * 20
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=270)
    tokenizer.save(tmp_path / "tokenizer")
    ids, _ = tokenizer.render_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]})
    ids = ids[:-1] + [tokenizer.encode_special("<|user_start|>"), *tokenizer.encode("general"), tokenizer.encode_special("<|user_end|>")]
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = build_model(config, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(tmp_path / "chatsft_checkpoints" / "runon", 150, model_state=model.state_dict(), optim_state=None,
                    data_state=None, meta={"model_config": config.to_dict()})
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "-t", "0"], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello there"


def test_missing_model_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "-s", "rl"], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "tok_train" in out.stderr


def test_missing_stage_names_where_it_looked_and_the_script(model_dir):
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "-s", "rl"], cwd=ROOT, env=_env(model_dir),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "chatrl_checkpoints" in out.stderr and "./rl.sh" in out.stderr
