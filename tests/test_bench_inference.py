"""bench/inference.py --smoke: every side (our eager and compiled-step engines, two
transformers caches) measured at both batch sizes, ratios printed, and all the
greedy tokens identical. No speed is asserted."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDES = [("ours", "slots"), ("ours", "slots_compiled"), ("transformers", "static"), ("transformers", "dynamic")]
ROW = re.compile(r"^\| (ours|transformers) \| (\w+) \| (\d+) \| ([\d,.]+) \| ([\d.]+) \| ([\d,.]+|nan) \|$", re.MULTILINE)


@pytest.fixture(scope="module")
def smoke_output() -> str:
    done = subprocess.run([sys.executable, "bench/inference.py", "--smoke", "--profile"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_machine_line_comes_first(smoke_output):
    assert smoke_output.startswith("machine: ")
    assert "torch " in smoke_output.splitlines()[0]


def test_a_row_for_each_side_cache_and_batch_with_positive_figures(smoke_output):
    rows = ROW.findall(smoke_output)
    assert sorted((side, cache, int(batch)) for side, cache, batch, *_ in rows) == sorted(
        (side, cache, batch) for batch in (1, 8) for side, cache in SIDES
    )
    for *_, prefill, ttft, decode in rows:
        figures = [number(prefill), number(ttft), number(decode)]
        assert all(math.isfinite(f) and f > 0 for f in figures), rows


def test_ratio_lines_for_decode_and_prefill_at_both_batches(smoke_output):
    for what in ("decode", "prefill"):
        for batch in (1, 8):
            line = re.search(rf"^ours / transformers {what} at batch {batch}: (.+)$", smoke_output, re.MULTILINE)
            assert line, f"no {what} ratio at batch {batch}"
            ratios = re.findall(r"(\d+\.\d\d)x \((static|dynamic) cache\)", line.group(1))
            assert [cache for _, cache in ratios] == ["static", "dynamic"]
            assert all(float(r) > 0 for r, _ in ratios)
            assert re.search(r"; ours best with (slots|slots_compiled)$", line.group(1))


def test_both_sides_pick_the_same_greedy_tokens(smoke_output):
    checks = re.findall(r"^greedy tokens of prompt 1, fp32, ours \(slots\) vs \w+ \((\w+) cache\): (.+)$", smoke_output, re.MULTILINE)
    assert [cache for cache, _ in checks] == ["slots_compiled", "static", "dynamic"]
    assert all(verdict.startswith("identical") for _, verdict in checks), checks


def test_profile_tables_for_each_side_and_batch(smoke_output):
    headers = re.findall(r"^(ours|transformers) \((\w+) cache\), batch (\d+): torch.profiler", smoke_output, re.MULTILINE)
    assert sorted(headers) == sorted((side, cache, str(batch)) for batch in (1, 8)
                                     for side, cache in SIDES)
    assert smoke_output.count("Self CPU time total:") == len(headers)


@pytest.mark.slow  # ~10 s: a second smoke run; `pytest -m slow`
def test_a_bfloat16_run_checks_greedy_tokens_on_fp32_copies_of_every_side():
    done = subprocess.run([sys.executable, "bench/inference.py", "--smoke", "--dtype", "bfloat16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "bfloat16 on cpu" in done.stdout
    checks = re.findall(r"^greedy tokens of prompt 1, fp32, ours \(slots\) vs \w+ \((\w+) cache\): identical", done.stdout, re.MULTILINE)
    assert checks == ["slots_compiled", "static", "dynamic"]
