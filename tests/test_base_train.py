"""base_train end to end on a tiny model: exact resume after SIGKILL, SIGTERM
checkpoints, 2-rank torchrun == 1 process with gradient accumulation, base_loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def _cmd(*args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return launcher + ["-m", "scripts.base_train", *TINY, *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(*args, nproc=1, check=True):
    out = subprocess.run(_cmd(*args, nproc=nproc), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _final_weights(base_dir, tag):
    steps = sorted((base_dir / "base_checkpoints" / tag).glob("step_*"))
    return load_file(str(steps[-1] / "model.safetensors"))


def _run_until(args, marker: str, sig: int) -> subprocess.Popen:
    """Start training, send `sig` once a stdout line contains `marker`; return the finished process."""
    proc = subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(sig)
            break
    proc.stdout.read()
    proc.wait(timeout=120)
    return proc


def test_sigkill_then_resume_is_bit_identical(workspace):
    steps = ["--num-iterations", "40", "--total-batch-size", str(2 * ROWS * SEQ), "--eval-every", "0"]
    _train(*steps, "--model-tag", "straight", "--save-every", "0")
    killed = _run_until([*steps, "--model-tag", "killed", "--save-every", "1"], "step 000020/", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = _train(*steps, "--model-tag", "killed", "--save-every", "1", "--resume")
    assert "resumed from" in resumed.stdout
    straight, again = _final_weights(workspace, "straight"), _final_weights(workspace, "killed")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(workspace):
    steps = ["--num-iterations", "200", "--total-batch-size", str(ROWS * SEQ), "--save-every", "0", "--eval-every", "0"]
    stopped = _run_until([*steps, "--model-tag", "t"], "step 000003/", signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM
    saved = sorted((workspace / "base_checkpoints" / "t").glob("step_*"))
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("_")[1]) < 200
    done = _train(*steps, "--model-tag", "t", "--resume")
    assert "step 000200/000200" in done.stdout and "validation bits per byte" in done.stdout


def test_two_ranks_equal_one_process_with_accumulation(workspace):
    common = ["--num-iterations", "4", "--total-batch-size", str(2 * ROWS * SEQ), "--eval-every", "0", "--save-every", "0"]
    single = _train(*common, "--model-tag", "single")
    assert "x 1 rank(s) x 2 accumulation step(s)" in single.stdout
    double = _train(*common, "--model-tag", "double", nproc=2)
    assert "x 2 rank(s) x 1 accumulation step(s)" in double.stdout
    a, b = _final_weights(workspace, "single"), _final_weights(workspace, "double")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["blocks.0.attn.o_proj.weight"], torch.zeros_like(a["blocks.0.attn.o_proj.weight"]))


def test_base_loss_reports_both_splits(workspace):
    _train("--num-iterations", "3", "--total-batch-size", str(ROWS * SEQ), "--eval-every", "0")
    out = subprocess.run([sys.executable, "-m", "scripts.base_loss", "--device-batch-size", "2", "--split-tokens", "512"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train bits per byte" in out.stdout and "val bits per byte" in out.stdout
    section = (workspace / "report" / "base-loss.md").read_text()
    assert "val bpb" in section and "d2 step 3" in section


def test_clear_errors_without_tokenizer_or_checkpoint(base_dir):
    out = _train("--num-iterations", "1", "--total-batch-size", str(ROWS * SEQ), check=False)
    assert out.returncode == 2 and "tok_train" in out.stdout
    loss = subprocess.run([sys.executable, "-m", "scripts.base_loss"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert loss.returncode == 2 and "tok_train" in loss.stdout


def test_batch_sizes_that_do_not_divide_are_refused(workspace):
    out = _train("--num-iterations", "1", "--total-batch-size", "100", check=False)
    assert out.returncode == 2 and "not a multiple" in out.stdout


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


def test_device_batch_is_measured_to_fit_before_step_one(workspace):
    """Unset: the default 32 or the largest power of two that fits, said in the log; set and too big:
    refused with the batch that would fit, unless --auto-batch or --ignore-memory-check."""
    limit = _limit_between(workspace, 8, 16)
    at = TINY.index("--device-batch-size")
    tiny = TINY[:at] + TINY[at + 2 :]
    common = ["--num-iterations", "1", "--total-batch-size", str(32 * SEQ), "--memory-limit", limit, "--save-every", "0"]

    def run(*args):
        return subprocess.run([sys.executable, "-m", "scripts.base_train", *tiny, *common, *args], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)

    chosen = run()
    assert chosen.returncode == 0, chosen.stdout[-3000:] + chosen.stderr[-3000:]
    assert "device batch 8 (the default 32 does not fit)" in chosen.stdout
    assert "= 8 rows x 32 tokens x 1 rank(s) x 4 accumulation step(s)" in chosen.stdout  # same tokens per step
    refused = run("--device-batch-size", "32", "--model-tag", "refused")
    assert refused.returncode == 3 and "--device-batch-size 8 would" in refused.stdout and "refusing to start" in refused.stdout
    assert not (workspace / "base_checkpoints" / "refused").exists()
    auto = run("--device-batch-size", "32", "--auto-batch", "--model-tag", "auto")
    assert auto.returncode == 0 and "device batch 8 (--auto-batch)" in auto.stdout
    forced = run("--device-batch-size", "32", "--ignore-memory-check", "--model-tag", "forced")
    assert forced.returncode == 0 and "starting at device batch 32 anyway" in forced.stdout
