"""The terminal chat: one-shot prompts, an interactive session, Ctrl-C during an answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from serving import ROOT, SCRIPT_ANSWER, make_slow_model


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
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "-s", "base", "-t", "0", "-m", "1500"], cwd=ROOT,
                            env=_env(model_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.stdin.write("hello world\n")
    proc.stdin.flush()
    seen = ""
    while "Assistant: " not in seen:
        seen += proc.stdout.read(1)
    seen += proc.stdout.read(5)  # some answer text has streamed
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "[stopped]" in seen + rest


def test_missing_model_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "-s", "rl"], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "tok_train" in out.stderr


def test_missing_stage_names_where_it_looked_and_the_script(model_dir):
    out = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "-s", "rl"], cwd=ROOT, env=_env(model_dir),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "chatrl_checkpoints" in out.stderr and "./rl.sh" in out.stderr
