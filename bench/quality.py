"""Quality at the CPU benchmark's settings: depth 4 trained 200 steps on a corpus,
validation bits per byte at steps 100 and 200, and the wall time.

    python bench/train.py --quality ../shared/data/corpus

Runs the real pipeline in a scratch $NANOCHAT_BASE_DIR: ./prepare.sh --from DIR
(import, 8,192-token tokenizer by default; the last shard is validation), then
scripts.base_train, whose log lines are read for the figures. Faster training
must not buy a worse number here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BPB_LINE = re.compile(r"step (\d+) \| validation bits per byte: ([0-9.]+)")
SETTINGS = ["--max-seq-len", "256", "--device-batch-size", "16", "--total-batch-size", "4096",
            "--eval-tokens", "524288", "--sample-every", "0", "--save-every", "0", "--model-tag", "quality"]


def _run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def run_quality(corpus: str, device: torch.device, steps: int = 200, depth: int = 4, vocab_size: int = 8192) -> int:
    """Print validation bpb at steps/2 and steps; 0 when both were found."""
    if not Path(corpus).exists():
        print(f"error: --quality {corpus}: no such folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nanochat-quality-") as base:
        env = {**os.environ, "NANOCHAT_BASE_DIR": base}
        _run(["bash", "prepare.sh", "--from", str(Path(corpus).resolve()), "--vocab-size", str(vocab_size), "--offline", "--no-wandb"], env)
        t0 = time.perf_counter()
        flags = ["--depth", str(depth), "--num-iterations", str(steps), "--eval-every", str(steps // 2), *SETTINGS]
        log = _run([sys.executable, "-m", "scripts.base_train", *flags, "--device", device.type], env)
        wall = time.perf_counter() - t0
    found = {int(step): float(bpb) for step, bpb in BPB_LINE.findall(log)}
    for step in (steps // 2, steps):
        print(f"validation bits per byte at step {step}: {found.get(step, float('nan')):.4f}")
    print(f"wall time of scripts.base_train ({steps} steps at depth {depth}, evaluations included): {wall / 60:.1f} min")
    return 0 if {steps // 2, steps} <= set(found) else 1
