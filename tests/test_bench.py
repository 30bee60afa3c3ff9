"""Every benchmark's --smoke run, so a broken bench fails CI. No speed is asserted:
the figures are checked for being there, finite and from both sides."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_train_bench_smoke_measures_both_sides():
    out = run_bench("bench/train.py", "--smoke", "--profile", "1")
    assert out.startswith("machine: ")
    for side in ("ours", "transformers"):  # each side's operator table, matmuls among the ops
        table = out[out.index(f"  {side}: torch.profiler"):]
        assert "aten::mm" in table.split("Self CPU time total:")[0]
    rows = re.findall(r"^\| (ours|transformers) \| eager \| ([\d,]+) \| ([\d.]+) \| n/a \| ([\d.]+) \|$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["ours", "transformers"]
    assert all(int(r[1].replace(",", "")) > 0 and float(r[2]) > 0 for r in rows)
    assert re.search(r"^ours / transformers: \d+\.\d\dx tokens/s, \d+\.\d\dx peak memory$", out, re.MULTILINE)


@pytest.mark.slow  # ~25 s: the whole prepare + base_train pipeline; `pytest -m slow`
def test_train_bench_quality_smoke_reports_bpb(tmp_path):
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(1, 9)))

    for i in range(3):  # the last shard is validation
        pq.write_table(pa.table({"text": [" ".join(word() for _ in range(200)) for _ in range(200)]}), tmp_path / f"shard_{i:05d}.parquet")
    out = run_bench("bench/train.py", "--quality", str(tmp_path), "--smoke")
    values = [float(v) for v in re.findall(r"validation bits per byte at step [12]: ([\d.]+)", out)]
    assert len(values) == 2 and all(0 < v < 20 for v in values)
    assert "wall time of scripts.base_train (2 steps at depth 1" in out
