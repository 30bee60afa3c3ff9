"""Post-training end to end on a tiny model and the generated sample tasks:
mid -> SFT -> RL -> chat_eval, each checkpoint loadable by the engine, report sections written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import load_model, resolve_source, save_checkpoint
from nanochat.engine import Engine
from nanochat.sampling import SamplingParams
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from tasks.sample_data import write_sample_task_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("post")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(write_sample_task_files(base / "tasks", size=24))
    texts = [line for f in (base / "tasks").glob("*.jsonl") for line in f.read_text().splitlines()]
    tokenizer = Tokenizer.train_from_iterator(texts * 3, vocab_size=400)
    tokenizer.save(base / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=400, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    save_checkpoint(base / "base_checkpoints" / "d2", 1, model_state=build_model(config, "cpu").state_dict(),
                    optim_state=None, data_state=None, meta={"model_config": config.to_dict()})
    return base, env


def run(env, module: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_mid_sft_rl_and_chat_eval(workspace):
    base, env = workspace
    mid = run(env, "scripts.mid_train", "--num-iterations", "3", "--device-batch-size", "2", "--max-seq-len", "128",
              "--total-batch-size", "512", "--eval-steps", "2", "--no-eval")
    assert "step 000003/000003" in mid.stdout and "(2 accumulation step(s))" in mid.stdout
    assert (base / "mid_checkpoints" / "d2" / "step_000003" / "meta.json").is_file()
    sft = run(env, "scripts.chat_sft", "--num-iterations", "3", "--device-batch-size", "2", "--examples-per-step", "4",
              "--max-seq-len", "128", "--eval-steps", "2", "--eval-problems", "2")
    assert "from mid d2 step 3" in sft.stdout and "ChatCORE" in sft.stdout
    rl = run(env, "scripts.chat_rl", "--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "2",
             "--device-batch-size", "2", "--max-new-tokens", "16", "--eval-every", "0", "--eval-examples", "2", "--no-eval")
    assert "rollout | mean reward" in rl.stdout and "pass@1" in rl.stdout
    assert "step 000002/000002" in rl.stdout
    for stage in ("mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        assert list((base / stage / "d2").glob("step_*"))
    evaluation = run(env, "scripts.chat_eval", "-i", "rl", "-a", "ARC-Easy", "GSM8K", "HumanEval", "--max-problems", "3", "--max-new-tokens", "16")
    assert "ARC-Easy" in evaluation.stdout and "ChatCORE" in evaluation.stdout
    metrics = json.loads((base / "report" / "chat-eval-rl.json").read_text())["metrics"]
    assert {"ARC-Easy", "GSM8K", "HumanEval", "ChatCORE"} <= set(metrics)
    for name in ("mid-train", "sft-train", "rl-train", "chat-eval-sft"):
        assert (base / "report" / f"{name}.md").is_file(), name
    check_engine_loads_every_stage(base)


def check_engine_loads_every_stage(base: Path) -> None:
    os.environ["NANOCHAT_BASE_DIR"] = str(base)  # restored by the autouse base_dir fixture's monkeypatch
    tokenizer = Tokenizer.load(base / "tokenizer")
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Who are you?"}]})
    for source in ("mid", "sft", "rl"):
        model, meta = load_model(source)
        assert meta["source"] == source and meta["model_tag"] == "d2"
        answer = Engine(model, tokenizer).generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0]
        assert answer.finish_reason in ("stop", "length")
    assert resolve_source("auto") == "rl"


def test_missing_predecessor_is_one_clear_error(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    Tokenizer({bytes([i]): i for i in range(256)}).save(tmp_path / "tokenizer")
    out = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--no-eval"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "mid_checkpoints" in out.stdout and "./midtrain.sh" in out.stdout
