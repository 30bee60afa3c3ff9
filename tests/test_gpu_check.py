"""bench/gpu_check.py: the smoke run on CPU (every check PASS or SKIP, a JSON
entry with finite figures per check; the quick checks in-process, the whole run
in the slow set), how failures, out-of-memory and a missing estimator are
reported, usage errors, and the MFU peak table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import hardware

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ holds scripts, not an installed package

from bench import gpu_check  # noqa: E402
from bench.gpu_check import Estimate, Outcome  # noqa: E402

GIB = 2**30
STATUSES = ("PASS", "FAIL", "SKIP")


def status_lines(stdout: str) -> dict[str, str]:
    """check name -> status, from the lines that start with a status."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STATUSES:
            found[parts[1]] = parts[0]
    return found


# The checks that need neither torch.compile nor transformers: ~10 s of the ~50 s the whole smoke run takes.
QUICK = ["bf16_vs_fp32", "chunked_loss", "d20_eager_memory", "d20_decode"]


def check_results(stdout: str, out: Path, names: list[str]) -> None:
    """Every named check PASS or SKIP in the log and in the JSON, with finite figures."""
    lines = status_lines(stdout)
    assert sorted(lines) == sorted(names), stdout
    assert all(status in ("PASS", "SKIP") for status in lines.values()), stdout
    for field in ("device: cpu", f"torch: {torch.__version__}", "cuda: "):
        assert field in stdout
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["checks"]] == names
    for check in data["checks"]:
        assert check["status"] == lines[check["name"]]
        assert check["figures"], check
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in check["figures"].values()), check
        assert check["seconds"] >= 0 and check["message"]
    assert data["header"]["torch"] == torch.__version__


def test_smoke_run_of_the_quick_checks_in_process(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--only", ",".join(QUICK), "--out", str(out)]) == 0
    check_results(capsys.readouterr().out, out, QUICK)


@pytest.mark.slow  # ~50 s: torch.compile twice and a transformers model; `pytest -m slow`
def test_smoke_run_on_cpu_passes_every_check(tmp_path):
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    check_results(done.stdout, out, [name for name, _ in gpu_check.CHECKS])


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("the kernel fell over\nsecond line")

    monkeypatch.setattr(gpu_check, "CHECKS", [("boom", boom), ("fine", lambda ctx: Outcome("PASS", "ok", {"x": 1.5}))])
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 1
    stdout = capsys.readouterr().out
    assert status_lines(stdout) == {"boom": "FAIL", "fine": "PASS"}
    assert "RuntimeError: the kernel fell over" in stdout and "second line" not in stdout
    data = json.loads(out.read_text())
    assert [(c["name"], c["status"]) for c in data["checks"]] == [("boom", "FAIL"), ("fine", "PASS")]
    assert data["checks"][1]["figures"] == {"x": 1.5}


def test_only_runs_the_named_checks(tmp_path, monkeypatch, capsys):
    ran = []
    checks = [(name, lambda ctx, name=name: ran.append(name) or Outcome("PASS", "ok", {"n": 1})) for name in ("a", "b", "c")]
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    assert gpu_check.main(["--device", "cpu", "--smoke", "--only", "c,a", "--out", str(tmp_path / "x.json")]) == 0
    assert ran == ["a", "c"]  # in the usual order, not the order asked


@pytest.mark.parametrize("argv", [["--device", "cpu"], ["--device", "cpu", "--smoke", "--only", "nonsense"]],
                         ids=["full-sizes-on-cpu", "unknown-check"])
def test_usage_errors_exit_2(argv, tmp_path, capsys):
    assert gpu_check.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    assert "gpu_check:" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- memory items


def test_missing_estimator_is_a_skip_not_a_crash(monkeypatch):
    import nanochat.memory

    monkeypatch.delattr(nanochat.memory, "measure_training_memory", raising=False)
    estimate = gpu_check.memory_estimate(gpu_check.big_config(gpu_check.SMOKE), 2, 128, torch.bfloat16)
    assert (estimate.total, estimate.status, estimate.note) == (None, "SKIP", "SKIP (estimate unavailable)")
    run = {"batch": 2, "estimate": estimate, "tok_per_s": 100.0, "mfu": None, "step_s": 0.1, "first_step_s": 1.0,
           "peak": 3 * GIB}
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.SMOKE, True, "aot_eager")
    memory = gpu_check.training_outcome(ctx, [run], "eager", memory_only=True)
    assert memory.status == "SKIP" and "SKIP (estimate unavailable)" in memory.message and "3.00 GiB" in memory.message
    speed = gpu_check.training_outcome(ctx, [run], "compiled", memory_only=False)
    assert speed.status == "PASS"  # the speed was measured; only its memory item is skipped


def test_out_of_memory_is_a_fail_that_shows_the_estimate():
    estimate = Estimate(60 * GIB, 58 * GIB, "ok", "60.00 GiB (tensors 58.00 GiB)")
    status, words, figures = gpu_check.describe_run({"batch": 32, "estimate": estimate, "oom": "CUDA out of memory."})
    assert status == "FAIL" and "out of memory" in words and "60.00 GiB" in words
    assert figures == {"b32_estimate_gib": 60.0}


@pytest.mark.parametrize("measured_gib, status", [(50, "PASS"), (65, "PASS"), (67, "FAIL")])
def test_measured_peak_may_exceed_the_estimate_by_10_percent_at_most(measured_gib, status):
    estimate = Estimate(60 * GIB, 58 * GIB, "ok", "60 GiB")
    got, words = gpu_check.memory_verdict(measured_gib * GIB, estimate)
    assert got == status and f"measured/estimate {measured_gib / 60:.2f}" in words


def test_on_cpu_the_peak_is_not_available_but_the_estimate_is_printed():
    got, words = gpu_check.memory_verdict(None, Estimate(3 * GIB, GIB, "ok", "3.00 GiB (tensors 1.00 GiB)"))
    assert got == "PASS" and "n/a (CPU)" in words and "3.00 GiB" in words


# ---------------------------------------------------------------- the MFU peak table


def test_peak_flops_is_unknown_off_cuda_and_outside_bf16():
    assert hardware.peak_flops(torch.device("cpu"), torch.bfloat16)[0] is None
    assert hardware.peak_flops(torch.device("cuda"), torch.float32)[0] is None


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GB10", 125e12),
    ("Tesla T4", None),
])
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(hardware, "device_name", lambda device: name)
    flops, source = hardware.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert flops == peak and source
