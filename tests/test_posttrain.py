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


def test_chat_core_is_the_mean_of_chance_centered_accuracies():
    from scripts.chat_eval import chat_core

    results = {"ARC-Easy": (0.5, "categorical"), "MMLU": (0.25, "categorical"), "GSM8K": (0.2, "generative")}
    assert chat_core(results) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.0 + 0.2) / 3)


def test_categorical_scoring_picks_the_letter_with_the_highest_logit(workspace):
    from scripts.chat_eval import score_categorical
    from tasks import ARC

    base, env = workspace
    tokenizer = Tokenizer.load(base / "tokenizer")
    torch.manual_seed(3)
    model = build_model(GPTConfig(sequence_len=256, vocab_size=400, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    task = ARC("ARC-Easy", "test", path=env["NANOCHAT_ARC_PATH"].format(subset="ARC-Easy", split="test"))
    expected = 0
    for i in range(8):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        logits = model(torch.tensor([prompt]))[0, -1]
        scores = [logits[tokenizer.encode(letter)[0]].item() for letter in conv["letters"]]
        expected += task.evaluate(conv, conv["letters"][scores.index(max(scores))])
    assert score_categorical(model, tokenizer, task, list(range(8)), batch_size=3) == expected


def test_sft_resume_after_sigterm_is_bit_identical(workspace, tmp_path):
    import shutil
    import signal

    from safetensors.torch import load_file

    base, env = workspace
    args = ["--source", "base", "--num-iterations", "12", "--device-batch-size", "2", "--examples-per-step", "4",
            "--max-seq-len", "128", "--eval-every", "0", "--eval-steps", "1", "--save-every", "0", "--no-eval"]
    copies = {}
    for name in ("straight", "stopped"):
        copies[name] = tmp_path / name
        shutil.copytree(base, copies[name], ignore=shutil.ignore_patterns("*_checkpoints", "report"))
        shutil.copytree(base / "base_checkpoints", copies[name] / "base_checkpoints")
    run({**env, "NANOCHAT_BASE_DIR": str(copies["straight"])}, "scripts.chat_sft", *args)
    stopped_env = {**env, "NANOCHAT_BASE_DIR": str(copies["stopped"])}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_sft", *args], cwd=ROOT, env=stopped_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 000004/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    resumed = run(stopped_env, "scripts.chat_sft", *args, "--resume")
    assert "resumed from" in resumed.stdout
    final = [load_file(str(c / "chatsft_checkpoints" / "d2" / "step_000012" / "model.safetensors")) for c in copies.values()]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("script", ["midtrain.sh", "sft.sh", "rl.sh"])
def test_stage_scripts_help(script):
    out = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--gpus" in out.stdout
    bad = subprocess.run(["bash", script, "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown option" in bad.stderr


def test_sample_task_answers_are_right():
    import random
    import re

    from tasks.sample_data import arc_rows, gsm8k_rows, mmlu_rows

    rnd = random.Random(1)
    for row in arc_rows(50, rnd):
        doubled = int(re.search(r"double (\d+)", row["question"]).group(1)) * 2
        assert row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])] == str(doubled)
    assert len({row["answerKey"] for row in arc_rows(50, rnd)}) == 4
    for row in mmlu_rows(50, rnd):
        a, b = map(int, re.findall(r"\d+", row["question"]))
        assert row["choices"][row["answer"]] == str(a + b)
    for row in gsm8k_rows(50, rnd):
        for expr, result in re.findall(r"<<([^=]+)=([^>]+)>>", row["answer"]):
            assert eval(expr) == int(result)  # the fixture's own arithmetic, nothing untrusted
        assert row["answer"].endswith(f"#### {result}")
