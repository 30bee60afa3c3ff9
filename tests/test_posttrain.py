"""Post-training end to end on a tiny model and the generated sample tasks:
mid -> SFT -> RL -> chat_eval, each checkpoint loadable by the engine, report sections written;
SFT resumed after SIGTERM and RL resumed from a checkpoint end on the uninterrupted runs' weights.
Stages run through main() in this process; only the run a signal stops is a child."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from child import Child
from nanochat.checkpoint import load_model, resolve_source, save_checkpoint
from nanochat.curves import read_records
from nanochat.engine import Engine
from nanochat.sampling import SamplingParams
from nanochat.stages import STAGES
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from tasks.sample_data import write_sample_task_files
from two_ranks import on_two_ranks

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


def run(capsys, script, *args: str) -> str:
    """script.main(args) in this process; what it printed."""
    capsys.readouterr()
    code = script.main(list(args))
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    return printed.out


def test_mid_sft_rl_and_chat_eval(workspace, in_process, capsys):
    from scripts import chat_eval, chat_rl, chat_sft, mid_train

    base, env = workspace
    in_process(env, base)
    mid = run(capsys, mid_train, "--num-iterations", "3", "--device-batch-size", "2", "--max-seq-len", "128",
              "--total-batch-size", "512", "--eval-steps", "2", "--no-eval")
    assert "step 000003/000003" in mid and "(2 accumulation step(s))" in mid
    assert (base / "mid_checkpoints" / "d2" / "step_000003" / "meta.json").is_file()
    sft = run(capsys, chat_sft, "--num-iterations", "3", "--device-batch-size", "2", "--examples-per-step", "4",
              "--max-seq-len", "128", "--eval-steps", "2", "--eval-problems", "2")
    assert "from mid d2 step 3" in sft and "ChatCORE" in sft
    rl = run(capsys, chat_rl, "--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "2",
             "--device-batch-size", "2", "--max-new-tokens", "16", "--eval-every", "0", "--eval-examples", "2", "--no-eval")
    assert "rollout | mean reward" in rl and "pass@1" in rl
    assert "step 000002/000002" in rl
    rewards, passes = read_records(base / "chatrl_checkpoints" / "d2" / "metrics.jsonl")  # RL's curves: reward and pass@k
    assert [r["step"] for r in rewards] == [1, 2] and all(0 <= r["reward"] <= 1 for r in rewards)
    assert [r["step"] for r in passes] == [2] and {"pass@1", "pass@2"} == set(passes[0]["eval"])
    assert all((base / "report" / f"curves-{stage}.png").read_bytes()[:4] == b"\x89PNG" for stage in ("mid", "sft", "rl"))
    for stage in ("mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        assert list((base / stage / "d2").glob("step_*"))
    evaluation = run(capsys, chat_eval, "-i", "rl", "-a", "ARC-Easy", "GSM8K", "HumanEval", "--max-problems", "3", "--max-new-tokens", "16")
    check_chat_eval_figures(evaluation, json.loads((base / "report" / "chat-eval-rl.json").read_text())["metrics"])
    for name in ("mid-train", "sft-train", "rl-train", "chat-eval-sft"):
        assert (base / "report" / f"{name}.md").is_file(), name
    check_engine_loads_every_stage(base)


def check_chat_eval_figures(stdout: str, metrics: dict) -> None:
    """Each task's accuracy in the report is its printed count over 3 problems; ChatCORE is computed from them."""
    from tasks.chat_eval import chat_core

    counts = {name: (int(right), int(total)) for name, right, total in re.findall(r"^(\S+) +(\d+)/(\d+) +=", stdout, re.MULTILINE)}
    assert set(counts) == {"ARC-Easy", "GSM8K", "HumanEval"}, stdout
    for name, (right, total) in counts.items():
        assert total == 3 and metrics[name] == right / total, (name, metrics)
    kinds = {"ARC-Easy": "categorical", "GSM8K": "generative", "HumanEval": "generative"}
    assert metrics["ChatCORE"] == pytest.approx(chat_core({name: (metrics[name], kind) for name, kind in kinds.items()}))


def check_engine_loads_every_stage(base: Path) -> None:
    tokenizer = Tokenizer.load(base / "tokenizer")
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Who are you?"}]})
    for source in ("mid", "sft", "rl"):
        model, meta = load_model(source)
        assert meta["source"] == source and meta["model_tag"] == "d2"
        answer = Engine(model, tokenizer).generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0]
        assert answer.finish_reason in ("stop", "length")
    assert resolve_source("auto") == "rl"


def test_missing_predecessor_is_one_clear_error(base_dir, capsys):
    from scripts import chat_sft

    Tokenizer({bytes([i]): i for i in range(256)}).save(base_dir / "tokenizer")
    assert chat_sft.main(["--no-eval"]) == 2
    out = capsys.readouterr().out
    assert "mid_checkpoints" in out and "./midtrain.sh" in out


def test_chat_core_is_the_mean_of_chance_centered_accuracies():
    from tasks.chat_eval import chat_core

    results = {"ARC-Easy": (0.5, "categorical"), "MMLU": (0.25, "categorical"), "GSM8K": (0.2, "generative")}
    assert chat_core(results) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.0 + 0.2) / 3)


def test_categorical_scoring_picks_the_letter_with_the_highest_logit(workspace):
    from tasks.chat_eval import score_categorical
    from tasks import ARC

    base, env = workspace
    tokenizer = Tokenizer.load(base / "tokenizer")
    torch.manual_seed(3)
    model = build_model(GPTConfig(sequence_len=256, vocab_size=400, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    task = ARC("ARC-Easy", "test", path=Path(env["NANOCHAT_TASK_DATA"]) / "arc-ARC-Easy-test.jsonl")
    expected = 0
    for i in range(8):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        logits = model(torch.tensor([prompt]))[0, -1]
        scores = [logits[tokenizer.encode(letter)[0]].item() for letter in conv["letters"]]
        expected += task.evaluate(conv, conv["letters"][scores.index(max(scores))])
    assert score_categorical(model, tokenizer, task, list(range(8)), batch_size=3) == expected


def copy_workspace(base: Path, to: Path) -> Path:
    """The tokenizer, task files and base checkpoint, without any later stage's output."""
    shutil.copytree(base, to, ignore=shutil.ignore_patterns("*_checkpoints", "report"))
    shutil.copytree(base / "base_checkpoints", to / "base_checkpoints")
    return to


@pytest.fixture
def in_process(monkeypatch, one_torch_thread):
    """For stages run in this process (no interpreter start-up): a function that points NANOCHAT_*
    at a workspace, `home` as the base dir, and returns that environment for a child."""

    def use(env: dict, home: Path) -> dict:
        for key, value in env.items():
            if key.startswith("NANOCHAT_"):
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(home))
        return {**env, "NANOCHAT_BASE_DIR": str(home)}

    return use


def final_weights(home: Path, stage: str, step: int) -> dict:
    return load_file(str(home / stage / "d2" / f"step_{step:06d}" / "model.safetensors"))


@pytest.mark.slow  # ~14 s: a straight SFT run, a stopped child and its resume; `pytest -m slow`
def test_sft_resume_after_sigterm_is_bit_identical(workspace, tmp_path, in_process, capsys):
    from scripts import chat_sft

    base, env = workspace
    args = ["--source", "base", "--num-iterations", "12", "--device-batch-size", "2", "--examples-per-step", "4",
            "--max-seq-len", "128", "--eval-every", "0", "--eval-steps", "1", "--save-every", "0", "--no-eval"]
    in_process(env, copy_workspace(base, tmp_path / "straight"))
    assert chat_sft.main(args) == 0
    stopped_env = in_process(env, copy_workspace(base, tmp_path / "stopped"))
    with Child([sys.executable, "-m", "scripts.chat_sft", *args], cwd=ROOT, env=stopped_env) as stopped:
        stopped.wait_for("step 000004/", timeout=240)
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.finish(timeout=120) == 128 + signal.SIGTERM, stopped.output[-3000:]
    capsys.readouterr()
    assert chat_sft.main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    straight, resumed = (final_weights(tmp_path / name, "chatsft_checkpoints", 12) for name in ("straight", "stopped"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_stage_started_again_continues_but_not_from_a_new_start_model(workspace, tmp_path, in_process, capsys):
    from scripts import chat_sft

    base, env = workspace
    home = copy_workspace(base, tmp_path / "again")
    in_process(env, home)
    args = ["--source", "base", "--device-batch-size", "2", "--examples-per-step", "4", "--max-seq-len", "128",
            "--eval-every", "0", "--eval-steps", "1", "--save-every", "0", "--no-eval"]
    run(capsys, chat_sft, *args, "--num-iterations", "2")
    again = run(capsys, chat_sft, *args, "--num-iterations", "3")  # no flag: it continues
    assert "continuing the run in" in again and "(step 2)" in again and "step 000003/000003" in again

    config = GPTConfig.from_dict(json.loads((home / "base_checkpoints" / "d2" / "step_000001" / "meta.json").read_text())["model_config"])
    save_checkpoint(home / "base_checkpoints" / "d2", 2, model_state=build_model(config, "cpu").state_dict(),
                    optim_state=None, data_state=None, meta={"model_config": config.to_dict()})  # pretraining went on
    capsys.readouterr()
    assert chat_sft.main([*args, "--num-iterations", "3"]) == 2
    refused = capsys.readouterr().out
    assert "started from: base d2 step 1 -> base d2 step 2" in refused and "--fresh" in refused
    fresh = run(capsys, chat_sft, *args, "--num-iterations", "2", "--fresh")
    assert "moved the old run aside" in fresh and "from base d2 step 2" in fresh and "step 000002/000002" in fresh


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_rl_resume_ends_on_the_weights_of_the_run_never_stopped(workspace, tmp_path, in_process, monkeypatch, capsys):
    import tasks
    from scripts import chat_rl

    class LengthParity(tasks.GSM8K):
        """A random model almost never gets a GSM8K number right, so every advantage would be 0;
        the parity of the answer's length differs within a group, so the updates depend on which questions came."""

        def reward(self, conversation: dict, completion: str) -> float:
            return float(len(completion) % 2)

    monkeypatch.setattr(tasks, "GSM8K", LengthParity)
    base, env = workspace
    home = copy_workspace(base, tmp_path / "home")
    in_process(env, home)
    args = ["--source", "base", "--num-iterations", "4", "--examples-per-step", "2", "--num-samples", "4", "--device-batch-size", "4",
            "--max-new-tokens", "12", "--eval-every", "0", "--eval-examples", "2", "--save-every", "2", "--no-eval"]
    assert chat_rl.main(args) == 0
    straight = final_weights(home, "chatrl_checkpoints", 4)
    shutil.rmtree(home / "chatrl_checkpoints" / "d2" / "step_000004")  # as if killed after step 2's checkpoint
    capsys.readouterr()
    assert chat_rl.main([*args, "--resume"]) == 0
    assert "(step 2)" in capsys.readouterr().out
    resumed = final_weights(home, "chatrl_checkpoints", 4)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("script", ["midtrain.sh", "sft.sh", "rl.sh"])
def test_stage_scripts_help_is_their_entry_points(script):
    out = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--gpus" in out.stdout and "-d N" in out.stdout
    assert f"python -m {STAGES[stage_of_script(script)].module}" in out.stdout


def stage_of_script(script: str) -> str:
    return next(stage.name for stage in STAGES.values() if stage.script == f"./{script}")


def test_a_stage_script_passes_an_unknown_option_to_the_entry_point_which_refuses_it():
    bad = subprocess.run(["bash", "sft.sh", "--gpus", "1", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_stage_scripts_take_the_evaluation_flags_the_readme_shows(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    out = subprocess.run(["bash", "sft.sh", "--gpus", "1", "--no-eval", "--eval-problems", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    # passed on to scripts.chat_sft, which then stops for want of a tokenizer: not the script refusing the flags
    said = out.stdout + out.stderr
    assert out.returncode == 2 and "unknown option" not in said and "no usable tokenizer" in said, said


def test_sample_task_answers_are_right():
    import random

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


def test_the_stage_scripts_short_forms_and_separator_reach_the_entry_point():
    """./sft.sh's flags are scripts.chat_sft's: -d N is --model-tag dN, -b N the device batch, a `--` is dropped."""
    from scripts import chat_rl, chat_sft, mid_train

    for script in (chat_sft, mid_train, chat_rl):
        args = script.parse_args(["-d", "12", "-b", "4", "--", "--no_eval"])
        assert (args.model_tag, args.device_batch_size, args.no_eval) == ("d12", 4, True)
        assert script.parse_args(["--batch_size=2", "--model-tag", "x"]).device_batch_size == 2
    with pytest.raises(SystemExit):
        chat_sft.parse_args(["-d", "12", "--model-tag", "d3"])


# ---------------------------------------------------------------- ranks agree on the device batch

TINY = GPTConfig(sequence_len=64, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


def _fit_on_rank(rank: int, port: int, limits: list, given: list, out: str) -> None:
    import torch.distributed as dist

    from nanochat.common import DistInfo
    from nanochat.runtime import BatchRequest, MemoryRefusal, fit_device_batch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(True, rank, rank, 2, torch.device("cpu"))
    model = build_model(TINY, "cpu")
    model.compute_dtype = torch.float32
    results = []
    try:
        for limit, batch in zip(limits[rank], given[rank]):
            try:
                results.append(fit_device_batch(model, BatchRequest(8, batch, memory_limit_gib=limit), 64, info, "sft")[0])
            except MemoryRefusal:
                results.append("refused")
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_ranks_train_with_the_smallest_device_batch_any_of_them_fits(tmp_path):
    """Rank 1 is told it has memory for device batch 2 but not 4; rank 0 has room for the default 8. Both train at 2;
    and when rank 1 cannot fit a batch the user gave, both refuse (neither waits alone at the next collective)."""
    from nanochat.memory import DEFAULT_MARGIN, measure_training_memory

    peak = {b: measure_training_memory(TINY, b, 64, torch.float32, 2, "sft").total / DEFAULT_MARGIN for b in (2, 4)}
    between = (peak[2] + peak[4]) / 2 / 2**30
    limits = [[None, None], [between, between]]
    given = [[None, 8], [None, 8]]
    on_two_ranks(_fit_on_rank, limits, given, str(tmp_path))
    chosen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert chosen == [[2, "refused"], [2, "refused"]]
