"""Every benchmark's --smoke run, so a broken bench fails CI. No speed is asserted:
the figures are checked for being there, finite and from both sides."""

from __future__ import annotations

import json
import math
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


def test_recipe_bench_reads_time_to_equal_quality_off_the_new_runs():
    from bench.recipe import Run, seconds_of, time_to_reach

    def run(seconds, bpb):
        return Run("series", "2026", 1, 1, "horizon", 10, seconds, seconds, bpb)

    runs = [run(10, 2.0), run(100, 1.5), run(1000, 1.2)]
    # halfway in bpb between the runs of 10 s and 100 s is halfway in log time: sqrt(10 x 100)
    assert time_to_reach(1.75, runs) == pytest.approx(math.sqrt(1000))
    assert time_to_reach(1.2, runs) == pytest.approx(1000)
    assert time_to_reach(1.0, runs) is None  # better than every run: not reached
    assert time_to_reach(2.5, runs) == 10  # worse than the shortest run: reached by it
    assert seconds_of("1h02m") == 3720 and seconds_of("3m04s") == 184 and seconds_of("1d02h03m") == 93780


@pytest.mark.slow  # ~2 min: eight tiny base_train runs; `pytest -m slow`
def test_recipe_bench_smoke_prints_every_table(tmp_path):
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(1, 9)))

    for i in range(3):  # the last shard is validation
        pq.write_table(pa.table({"text": [" ".join(word() for _ in range(rng.randint(20, 300))) for _ in range(300)]}),
                       tmp_path / f"shard_{i:05d}.parquet")
    out = run_bench("bench/recipe.py", "--data", str(tmp_path), "--smoke", "--out", str(tmp_path / "r.json"), timeout=600)
    assert out.startswith("machine: ")
    for title in ("## Scaling series", "## Depth 1, 0.25 min per run", "## Ablation at depth 1"):
        assert title in out
    assert re.search(r"^\| 2025-10 \| 1 \| [\d,]+ \| \d+ \| \d\.\d{4} \|$", out, re.MULTILINE)
    assert re.search(r"^\| without Power-Lines batch \| [\d,]+ \| \d\.\d{4} \|$", out, re.MULTILINE)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {r["part"] for r in saved["runs"]} == {"series", "large", "ablation"} and len(saved["runs"]) == 7
    assert all(0 < r["final_bpb"] < 20 and r["steps"] >= 1 for r in saved["runs"])
