"""speedrun.sh --tiny --smoke end to end on a generated corpus and a toy CORE bundle (no network), CORE
run once with the tiny limit, then a rerun with --force of one stage, which skips every other finished
stage (in the slow set); its flags."""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from test_core_eval import write_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("speedrun")
    corpus = base / "corpus"
    corpus.mkdir()
    rnd = random.Random(0)
    words = ["".join(rnd.choice("etaoinshrdlucmfwypvbgk") for _ in range(rnd.randint(2, 9))) for _ in range(3000)]
    for i in range(120):
        (corpus / f"doc{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(800)), encoding="utf-8")
    write_bundle(base / "bundle")
    return base


def speedrun(base: Path, *args: str) -> subprocess.CompletedProcess:
    # one thread: at these sizes a second one gains little, and while other work holds a core it costs several times over
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base / "home"), "OMP_NUM_THREADS": "1",
           "NANOCHAT_EVAL_BUNDLE": str(base / "bundle")}
    return subprocess.run(["bash", "speedrun.sh", "--tiny", "--smoke", "--data", str(base / "corpus"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


# ~2.5 min: about 30 Python starts (3 s of torch import each) for the pipeline and the rerun; `pytest -m slow`
@pytest.mark.slow
@pytest.mark.timeout(900)  # several times the 2.5 min when other work holds the cores
def test_tiny_pipeline_end_to_end_then_rerun_skips(run_dir):
    first = speedrun(run_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    home = run_dir / "home"
    for stage in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        assert list(home.glob(f"{stage}/*/step_*")), stage
    report = (home / "report" / "report.md").read_text()
    assert "| ChatCORE |" in report or "ChatCORE" in report
    for stage in ("base", "mid", "sft", "rl"):  # every training stage's curves, embedded in the card
        assert f"![{stage}](curves-{stage}.png)" in report and (home / "report" / f"curves-{stage}.png").is_file(), stage
    assert "speedrun finished" in first.stdout and "./chat_cli.sh" in first.stdout
    # CORE once (its own stage, not pretrain.sh's too), on the --smoke subset rather than every example
    assert first.stdout.count("CORE of ") == 1 and "(at most 2 examples per task," in first.stdout
    table = re.findall(r"^\| (\S+) \| (\d+)m(\d\d)s \|$", first.stdout, re.MULTILINE)
    assert [stage for stage, _, _ in table] == ["prepare", "pretrain", "base-eval", "mid", "sft", "rl", "chat-eval"]
    assert "## Wall time by stage" in report and "| pretrain |" in report
    forced = speedrun(run_dir, "--force", "sft")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    for stage in ("prepare", "pretrain", "base-eval", "mid", "rl", "chat-eval"):
        assert f"== {stage}: already done, skipping" in forced.stdout, stage
    assert "== sft: already done" not in forced.stdout and "step 000002/000002" in forced.stdout
    assert list(home.glob("chatsft_checkpoints.old-*/*/step_*")) and list(home.glob("chatsft_checkpoints/*/step_*"))


def test_bad_flags(run_dir):
    bad = subprocess.run(["bash", "speedrun.sh", "--force", "everything"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--force takes one of" in bad.stderr
    missing = subprocess.run(["bash", "speedrun.sh", "--tiny", "--data", str(run_dir / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    both = subprocess.run(["bash", "speedrun.sh", "--data", str(run_dir / "corpus"), "--dataset", "climbmix"], cwd=ROOT,
                          capture_output=True, text=True)
    assert both.returncode == 2 and "exclude each other" in both.stderr
    helped = subprocess.run(["bash", "speedrun.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "--tiny" in helped.stdout and "--skip-rl" in helped.stdout and "--dataset NAME" in helped.stdout


def traced(script: str, base: Path, *args: str) -> subprocess.CompletedProcess:
    """`bash -x SCRIPT ARGS` with nothing prepared: it runs until base_train stops for want of a tokenizer,
    and the trace shows the command lines the script built (only its own: -x does not reach child scripts)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run(["bash", "-x", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def launched(out: subprocess.CompletedProcess, command: str) -> list[str]:
    lines = [line for line in out.stderr.splitlines() if line.startswith(f"+ {command} ")]
    assert len(lines) == 1, out.stdout[-2000:] + out.stderr[-2000:]
    return lines[0].split()[2:]


@pytest.mark.parametrize("given,depth", [((), None), (("-d", "6"), "6")])
def test_pretrain_time_budget_leaves_the_depth_to_base_train_unless_given(tmp_path, given, depth):
    out = traced("pretrain.sh", tmp_path, "--time_budget=90m", "--gpus", "1", *given)
    args = launched(out, "launch scripts.base_train")
    assert args[args.index("--time-budget") + 1] == "90m"
    assert (args[args.index("--depth") + 1] if "--depth" in args else None) == depth
    assert f"pretraining: depth {depth or 'chosen by the 90m time budget'}," in out.stdout
    without = launched(traced("pretrain.sh", tmp_path, "--gpus", "1"), "launch scripts.base_train")
    assert "--time-budget" not in without and without[without.index("--depth") + 1] == "20"


def test_tiny_speedrun_with_a_time_budget_leaves_steps_and_depth_to_it(tmp_path):
    (tmp_path / "speedrun").mkdir()
    (tmp_path / "speedrun" / "prepare.done").write_text("")  # straight to pretraining, which stops at the tokenizer
    out = traced("speedrun.sh", tmp_path, "--tiny", "--time-budget", "2.5h")
    args = launched(out, "./pretrain.sh")
    assert args[args.index("--time-budget") + 1] == "2.5h"
    assert "--depth" not in args and "--num-iterations" not in args
    assert args[args.index("--max-seq-len") + 1] == "256"  # the tiny model's shape stays
    assert "time budget 2.5h covers pretraining with its evaluations" in out.stdout
    plain = launched(traced("speedrun.sh", tmp_path, "--tiny"), "./pretrain.sh")
    assert "--time-budget" not in plain and plain[plain.index("--depth") + 1] == "4" and "--num-iterations" in plain


@pytest.mark.parametrize("script", ["pretrain.sh", "speedrun.sh"])
def test_a_malformed_time_budget_stops_before_anything_runs(tmp_path, script):
    out = subprocess.run(["bash", script, "--time-budget", "1h30m"], cwd=ROOT, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "time budget '1h30m' is not a duration: write it like 90m" in out.stderr
    assert "==" not in out.stdout  # no stage (nor setup) started
