"""base_train end to end on a tiny model: exact resume after SIGKILL, SIGTERM checkpoints,
2 ranks (torchrun, gloo) == 1 process with gradient accumulation, also when a SIGTERM reaches
one rank only and the run resumes through both ranks' checkpoint files, the memory refusal and
out-of-memory exit codes, base_loss.

Runs that need neither a signal nor a second rank call main() in this process (an interpreter
start-up saved each) on one torch thread, so they compute the same bits as the children."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from child import Child, descendants
from conftest import write_shard
from nanochat.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ROWS, SEQ = 2, 32  # one micro-batch = ROWS x (SEQ + 1) tokens
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", str(SEQ),
        "--device-batch-size", str(ROWS), "--eval-tokens", "256", "--sample-every", "0", "--keep-last", "100"]


@pytest.fixture
def workspace(base_dir):
    """A byte-level tokenizer (no merges: one token per ASCII character) and shards
    whose every row group holds one document of exactly one micro-batch of tokens,
    so single-process and multi-rank runs see the same micro-batches."""
    Tokenizer({bytes([i]): i for i in range(256)}).save(base_dir / "tokenizer")
    doc_chars = ROWS * (SEQ + 1) - 1  # + <|bos|>
    letters = "abcdefghijklmnopqrstuvwxyz "
    for shard in range(3):
        docs = ["".join(letters[(shard * 7 + d * 3 + i * i) % 27] for i in range(doc_chars)) for d in range(40)]
        write_shard(base_dir / "base_data" / f"shard_{shard:05d}.parquet", docs, rows_per_group=1)
    return base_dir


@pytest.fixture
def here(capsys, one_torch_thread):
    """base_train.main(TINY + args) in this process: (exit code, what it printed)."""
    from scripts import base_train

    def run(*args: str, tiny: list[str] = TINY) -> tuple[int, str]:
        capsys.readouterr()
        code = base_train.main([*tiny, *args])
        return code, capsys.readouterr().out

    return run


def _cmd(*args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return launcher + ["-m", "scripts.base_train", *TINY, *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(*args, nproc=1):
    out = subprocess.run(_cmd(*args, nproc=nproc), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _checkpoints(base_dir, tag) -> list[Path]:
    return sorted((base_dir / "base_checkpoints" / tag).glob("step_*"))


def _final_weights(base_dir, tag):
    return load_file(str(_checkpoints(base_dir, tag)[-1] / "model.safetensors"))


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank`: the process under `launcher` with RANK=rank in its environment."""
    for pid in descendants(launcher):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:  # the process ended meanwhile
            continue
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


@pytest.mark.slow  # ~50 s: a straight run, a killed one and its restart; `pytest -m slow`
def test_sigkill_then_resume_is_bit_identical(workspace, here):
    steps = ["--num-iterations", "40", "--total-batch-size", str(2 * ROWS * SEQ), "--eval-every", "0"]
    assert here(*steps, "--model-tag", "straight", "--save-every", "0")[0] == 0
    with Child(_cmd(*steps, "--model-tag", "killed", "--save-every", "1"), cwd=ROOT, env=_env()) as killed:
        killed.wait_for("step 000020/", timeout=240)
        killed.proc.kill()
        assert killed.finish(timeout=60) == -signal.SIGKILL
    code, out = here(*steps, "--model-tag", "killed", "--save-every", "1")  # started again, no flag: it continues
    assert code == 0 and "continuing the run in" in out and "resumed from" in out
    straight, again = _final_weights(workspace, "straight"), _final_weights(workspace, "killed")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


@pytest.mark.slow  # ~16 s: a child run stopped by SIGTERM, then resumed; `pytest -m slow`
def test_sigterm_saves_a_checkpoint_and_resume_finishes(workspace, here):
    steps = ["--num-iterations", "200", "--total-batch-size", str(ROWS * SEQ), "--save-every", "0", "--eval-every", "0"]
    with Child(_cmd(*steps, "--model-tag", "t"), cwd=ROOT, env=_env()) as stopped:
        stopped.wait_for("step 000003/", timeout=240)
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.finish(timeout=120) == 128 + signal.SIGTERM
    saved = _checkpoints(workspace, "t")
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("_")[1]) < 200
    code, out = here(*steps, "--model-tag", "t", "--resume")
    assert code == 0 and "step 000200/000200" in out and "validation bits per byte" in out


def test_a_run_started_again_continues_refuses_other_settings_and_fresh_moves_it_aside(workspace, here):
    steps = ["--total-batch-size", str(ROWS * SEQ), "--save-every", "0", "--eval-every", "0", "--model-tag", "again"]
    assert here(*steps, "--num-iterations", "3")[0] == 0
    code, out = here(*steps, "--num-iterations", "5")
    assert code == 0 and "continuing the run in" in out and "(step 3)" in out and "step 000005/000005" in out
    assert "step 000003/" not in out  # steps 1-3 were not trained again

    code, out = here(*steps[:1], str(2 * ROWS * SEQ), *steps[2:], "--num-iterations", "5")
    assert code == 2 and f"--total-batch-size: {ROWS * SEQ} -> {2 * ROWS * SEQ}" in out and "--fresh" in out
    assert [p.name for p in _checkpoints(workspace, "again")] == ["step_000003", "step_000005"]  # untouched

    code, out = here(*steps, "--num-iterations", "2", "--fresh")
    assert code == 0 and "moved the old run aside" in out and "step 000001/000002" in out
    old = [p for p in (workspace / "base_checkpoints").iterdir() if p.name.startswith("again.old-")]
    assert len(old) == 1 and (old[0] / "step_000005").is_dir()
    assert [p.name for p in _checkpoints(workspace, "again")] == ["step_000002"]

    code, out = here(*steps[:-1], "nothing-here", "--num-iterations", "2", "--resume")
    assert code == 2 and "no checkpoint" in out


@pytest.mark.slow  # ~34 s: torchrun with 2 ranks, twice; `pytest -m slow`
def test_two_ranks_equal_one_process_also_across_a_sigterm_to_one_rank(workspace, here):
    """Rank 1 alone gets SIGTERM: both ranks stop after the same step and write their own
    optimizer and data files; resuming with 1 process is refused, with 2 it ends where the
    single process with 2 accumulation steps does. Concat packing: each fixture document is then
    exactly one micro-batch, so both layouts see the same documents in each step (best-fit's
    split over ranks is tested in test_dataloader)."""
    steps = ["--num-iterations", "16", "--total-batch-size", str(2 * ROWS * SEQ), "--eval-every", "0", "--save-every", "0",
             "--packing", "concat"]
    code, single = here(*steps, "--model-tag", "single")
    assert code == 0 and "x 1 rank(s) x 2 accumulation step(s)" in single
    with Child(_cmd(*steps, "--model-tag", "double", nproc=2), cwd=ROOT, env=_env()) as stopped:
        stopped.wait_for("step 000002/", timeout=240)
        os.kill(_worker_pid(stopped.proc.pid, rank=1), signal.SIGTERM)
        assert stopped.finish(timeout=120) != 0
    assert "x 2 rank(s) x 1 accumulation step(s)" in stopped.output
    assert re.search(r"^stopped at step \d+; run the same command again to continue$", stopped.output, re.MULTILINE), stopped.output[-3000:]
    saved = _checkpoints(workspace, "double")
    assert len(saved) == 1 and 2 <= int(saved[0].name.split("_")[1]) < 16
    assert {f"{kind}_rank{r}.{ext}" for kind, ext in (("optim", "pt"), ("data", "json")) for r in (0, 1)} <= {p.name for p in saved[0].iterdir()}
    assert json.loads((saved[0] / "meta.json").read_text())["world_size"] == 2
    code, refused = here(*steps, "--model-tag", "double", "--resume")
    assert code == 2 and "written by 2 rank(s)" in refused
    resumed = _train(*steps, "--model-tag", "double", "--resume", nproc=2)
    assert f"resumed from {saved[0]}" in resumed.stdout
    a, b = _final_weights(workspace, "single"), _final_weights(workspace, "double")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["blocks.0.attn.o_proj.weight"], torch.zeros_like(a["blocks.0.attn.o_proj.weight"]))


def test_base_loss_reports_both_splits(workspace, here, capsys):
    from scripts import base_loss

    assert here("--num-iterations", "3", "--total-batch-size", str(ROWS * SEQ), "--eval-every", "0")[0] == 0
    assert base_loss.main(["--device-batch-size", "2", "--split-tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "train bits per byte" in out and "val bits per byte" in out
    section = (workspace / "report" / "base-loss.md").read_text()
    assert "val bpb" in section and "d2 step 3" in section


def test_clear_errors_without_tokenizer_or_checkpoint(base_dir, here, capsys):
    from scripts import base_loss

    code, out = here("--num-iterations", "1", "--total-batch-size", str(ROWS * SEQ))
    assert code == 2 and "tok_train" in out
    assert base_loss.main([]) == 2 and "tok_train" in capsys.readouterr().out


def test_pretraining_reads_the_dataset_prepare_chose(workspace, here):
    """./prepare.sh --dataset climbmix, then ./pretrain.sh as always: base_train reads base_data_climbmix
    (there is no base_data here, so reading the default folder would fail)."""
    from nanochat.shards import choose_folder

    (workspace / "base_data").rename(workspace / "base_data_climbmix")
    choose_folder("base_data_climbmix")
    code, out = here("--num-iterations", "1", "--total-batch-size", str(ROWS * SEQ), "--save-every", "0")
    assert code == 0 and "step 000001/000001" in out, out[-3000:]


def test_batch_sizes_that_do_not_divide_are_refused(workspace, here):
    code, out = here("--num-iterations", "1", "--total-batch-size", "100")
    assert code == 2 and "not a multiple" in out


def test_out_of_memory_exits_3_naming_a_smaller_batch(workspace, here, monkeypatch):
    from nanochat.training import TrainLoop

    def oom(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainLoop, "train_step", oom)
    handler = signal.getsignal(signal.SIGINT)
    code, out = here("--num-iterations", "1", "--total-batch-size", str(ROWS * SEQ), "--model-tag", "oom")
    assert code == 3 and "out of memory at --device-batch-size 2; run again with --device-batch-size 1" in out
    assert "it continues from the last checkpoint" in out
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handlers are gone with it


@pytest.mark.slow  # ~21 s: ./pretrain.sh end to end; `pytest -m slow`
def test_pretrain_script_trains_then_measures(workspace):
    tiny = ["--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", str(SEQ), "--num-iterations", "3",
            "--total-batch-size", str(ROWS * SEQ), "--eval-tokens", "256", "--sample-every", "0"]
    out = subprocess.run(["bash", "pretrain.sh", "--depth", "2", "--batch-size", str(ROWS), "--", *tiny],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "step 000003/000003" in out.stdout and "val bits per byte" in out.stdout
    assert (workspace / "base_checkpoints" / "d2" / "step_000003" / "meta.json").is_file()
    helped = subprocess.run(["bash", "pretrain.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "--resume" in helped.stdout and "--nnodes" in helped.stdout
    bad = subprocess.run(["bash", "pretrain.sh", "--depht", "3"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown option" in bad.stderr


def _limit_between(workspace, small: int, large: int) -> str:
    """A --memory-limit (GiB) under which device batch `small` fits and `large` does not."""
    from nanochat.gpt import config_for_depth
    from nanochat.memory import DEFAULT_MARGIN, measure_training_memory

    vocab = Tokenizer.load(workspace / "tokenizer").get_vocab_size()
    config = config_for_depth(2, vocab, aspect_ratio=32, head_dim=32, max_seq_len=SEQ)
    fits, too_big = (measure_training_memory(config, b, SEQ, torch.float32).total for b in (small, large))
    assert fits < too_big
    return f"{(fits + too_big) / 2 / DEFAULT_MARGIN / 2**30:.6f}"


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_device_batch_is_measured_to_fit_before_step_one(workspace, here):
    """Unset: the default 32 or the largest power of two that fits, said in the log; set and too big:
    refused (exit 3) with the batch that would fit, unless --auto-batch or --ignore-memory-check."""
    limit = _limit_between(workspace, 8, 16)
    at = TINY.index("--device-batch-size")
    tiny = TINY[:at] + TINY[at + 2 :]
    common = ["--num-iterations", "1", "--total-batch-size", str(32 * SEQ), "--memory-limit", limit, "--save-every", "0"]
    code, chosen = here(*common, tiny=tiny)
    assert code == 0, chosen[-3000:]
    assert "device batch 8 (the default 32 does not fit)" in chosen
    assert "= 8 rows x 32 tokens x 1 rank(s) x 4 accumulation step(s)" in chosen  # same tokens per step
    code, refused = here(*common, "--device-batch-size", "32", "--model-tag", "refused", tiny=tiny)
    assert code == 3 and "--device-batch-size 8 would" in refused and "refusing to start" in refused
    assert not (workspace / "base_checkpoints" / "refused").exists()
    code, auto = here(*common, "--device-batch-size", "32", "--auto-batch", "--model-tag", "auto", tiny=tiny)
    assert code == 0 and "device batch 8 (--auto-batch)" in auto
    code, forced = here(*common, "--device-batch-size", "32", "--ignore-memory-check", "--model-tag", "forced", tiny=tiny)
    assert code == 0 and "starting at device batch 32 anyway" in forced


@pytest.mark.slow  # ~40 s: the rule's batch is many accumulation steps of one row
def test_the_log_shows_the_recipe_parameters_by_kind_and_the_power_lines_batch(workspace, here):
    """No --total-batch-size: the Power-Lines rule picks it from this depth's horizon against depth 12's
    (same vocabulary and shape); learning rates follow sqrt(batch / 2^19); the report card has the counts."""
    import math

    from nanochat.gpt import GPT, config_for_depth

    code, out = here("--num-iterations", "1", "--eval-every", "0", "--device-batch-size", "1", "--model-tag", "rule")
    assert code == 0, out[-3000:]
    vocab = int(re.search(r"vocab ([\d,]+)", out).group(1).replace(",", ""))

    def scaling(depth):
        with torch.device("meta"):
            return GPT(config_for_depth(depth, vocab, aspect_ratio=32, head_dim=32, max_seq_len=SEQ)).scaling_params()

    expected = 2 ** round(19 + 0.383 * math.log2(scaling(2) / scaling(12)))
    assert f"tokens per step: {expected:,} = 1 rows x {SEQ} tokens" in out
    assert f"learning rates x {math.sqrt(expected / 2**19):.3f} for the batch" in out
    assert "recipe 2026: polar-express, NorMuon on, weight decay 0.2 (cautious on), best-fit packing" in out
    assert re.search(r"parameters: embedding [\d,]+, matrices [\d,]+, head [\d,]+; total [\d,]+, scaling \(matrices \+ head\) "
                     + f"{scaling(2):,}", out)
    section = (workspace / "report" / "base-train.md").read_text()
    assert "matrix parameters" in section and "tokens per parameter" in section and "parameters counted: matrices + head" in section

    code, out = here("--num-iterations", "1", "--eval-every", "0", "--recipe", "2025-10", "--model-tag", "old",
                     "--device-batch-size", "16")
    assert code == 0 and f"tokens per step: 524,288 = 16 rows x {SEQ} tokens" in out, out[-3000:]
    assert "recipe 2025-10: newton-schulz, NorMuon off, weight decay 0 (cautious off), concat packing, learning rates x 1.000" in out


def test_a_time_budget_picks_the_depth_trains_within_it_and_a_restart_keeps_its_plan(workspace, here):
    import time

    at = TINY.index("--depth")
    tiny = TINY[:at] + TINY[at + 2:]
    budget = ["--time-budget", "25s", "--eval-every", "0", "--save-every", "5"]
    started = time.perf_counter()
    code, out = here(*budget, tiny=tiny)
    took = time.perf_counter() - started
    assert code == 0, out[-3000:]
    plan = re.search(r"^time budget 25s: depth (\d+), [\d.]+[MB] tokens \(([\d,]+) per step\), ~\S+ at a measured", out, re.MULTILINE)
    assert plan, out[-3000:]
    depth, steps = int(plan.group(1)), int(re.search(r"steps: ([\d,]+)", out).group(1).replace(",", ""))
    assert f"time budget: depth {depth} measured at" in out and steps > 1
    assert 0.4 * 25 < took < 2.0 * 25  # a generous band: this is a loaded 2-core machine; bench/README has the real figure
    saved = json.loads((workspace / "base_checkpoints" / "time_budget.json").read_text())
    assert saved["depth"] == depth and saved["num_iterations"] == steps

    code, out = here(*budget, tiny=tiny)  # started again: the same plan, nothing measured, the run is complete
    assert code == 0 and "the plan this run made at its start" in out and "measured at" not in out.split("time budget 25s")[0]
    assert f"continuing the run in {workspace / 'base_checkpoints' / f'd{depth}'}" in out


def test_a_time_budget_refuses_a_step_count_and_a_bad_duration(workspace, here):
    code, out = here("--time-budget", "10m", "--num-iterations", "5")
    assert code == 2 and "leave out --num-iterations" in out
    code, out = here("--time-budget", "ten minutes")
    assert code == 2 and "write it like 90m, 2.5h or 3d" in out


def test_the_loop_takes_a_compiled_model(base_dir, one_torch_thread):
    """The training loop steps the compiled model it is given (a truth test of a compiled module asks its
    len() and raised, which every GPU run, always compiled, would have hit before step 1)."""
    from nanochat.common import DistInfo
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.optim import build_optimizers
    from nanochat.training import LoopSettings, TrainLoop

    model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16), "cpu")
    compiled = torch.compile(model, backend="eager")
    calls = []
    batch = torch.randint(32, (2, 8), generator=torch.Generator().manual_seed(0))

    class Batches:
        def __next__(self):
            return batch, batch

        def state_dict(self):
            return {}

    loop = TrainLoop(model=model, step_model=compiled, optimizers=build_optimizers(model), batches=Batches(),
                     settings=LoopSettings(num_iterations=2, grad_accum_steps=1), info=DistInfo(False, 0, 0, 1, torch.device("cpu")),
                     tag_dir=base_dir / "loop", meta={}, loss_fn=lambda m, b: calls.append(m) or m(*b))
    assert loop.run() == 0
    assert calls and all(m is compiled for m in calls)


@pytest.mark.slow  # ~40 s: torchrun with 2 ranks; `pytest -m slow`
def test_two_ranks_plan_a_time_budget_alike(workspace):
    """The probes are collective, so both ranks must probe the same depths and settle on one plan
    (the slowest rank's speed, the longest probe): the run ends instead of hanging."""
    at = TINY.index("--depth")
    tiny = TINY[:at] + TINY[at + 2:]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.base_train", *tiny, "--time-budget", "30s", "--eval-every", "0"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = re.search(r"^time budget 30s: depth (\d+)", out.stdout, re.MULTILINE)
    assert plan and "x 2 rank(s)" in out.stdout and "training done" in out.stdout
