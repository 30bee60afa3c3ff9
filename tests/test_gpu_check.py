"""bench/gpu_check.py: the smoke run on CPU (every check PASS or SKIP, a JSON
entry with finite figures per check; the quick checks in-process, the whole run
in the slow set), the recipe A/B on fixture shards (both runs' bpb and their
ratio, a failing run, no data, the tokenizer it trains), how failures,
out-of-memory and a missing estimator are reported, usage errors, and the MFU
peak table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_shard
from nanochat import hardware
from nanochat.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ holds scripts, not an installed package

from bench import gpu_check  # noqa: E402
from bench.gpu_check import Estimate, Outcome, Peak  # noqa: E402

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


# The checks that need neither torch.compile nor transformers: ~10 s of the ~70 s the whole smoke run takes.
QUICK = ["bf16_matmul", "attention_kernel", "bf16_vs_fp32", "chunked_loss", "d20_eager_memory", "d20_decode"]


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


@pytest.fixture
def ab_workspace(tmp_path) -> tuple[Path, Path]:
    """(data, tokenizer) for recipe_ab: 3 shards of short sentences from a small vocabulary (a text a tiny model
    learns within seconds, so bits per byte fall) and a byte-level tokenizer (no merges, nothing to train)."""
    words = "the cat sat on a mat and dog ran far away from home".split()
    for shard in range(3):
        docs = [" ".join(words[(shard + d * 7 + i * i) % len(words)] for i in range(10 + d % 50)) for d in range(400)]
        write_shard(tmp_path / "data" / f"shard_{shard:05d}.parquet", docs)
    return tmp_path / "data", Tokenizer({bytes([i]): i for i in range(256)}).save(tmp_path / "tokenizer")


@pytest.mark.slow  # ~60 s: torch.compile twice, a transformers model and two 10 s pretraining runs; `pytest -m slow`
def test_smoke_run_on_cpu_passes_every_check(tmp_path, ab_workspace):
    out, (data, tokenizer) = tmp_path / "x.json", ab_workspace
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out),
                           "--data", str(data), "--tokenizer", str(tokenizer)],
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


@pytest.mark.parametrize("argv, says", [
    (["--device", "cpu"], "on CPU add --smoke"),
    (["--device", "cpu", "--smoke", "--only", "nonsense"], "unknown check(s) nonsense"),
    (["--device", "cpu", "--smoke", "--data", "."], "needs at least 2"),
    (["--device", "cpu", "--smoke", "--tokenizer", "no-such-folder"], "is not a folder"),
], ids=["full-sizes-on-cpu", "unknown-check", "data-without-shards", "tokenizer-not-a-folder"])
def test_usage_errors_exit_2(argv, says, tmp_path, capsys):
    assert gpu_check.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "gpu_check:" in err and says in err
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- recipe_ab


def run_recipe_ab(tmp_path, capsys, *extra: str) -> tuple[int, str, dict]:
    """(exit code, stdout, recipe_ab's JSON entry) of gpu_check --smoke --only recipe_ab."""
    out = tmp_path / "out" / "x.json"
    code = gpu_check.main(["--device", "cpu", "--smoke", "--only", "recipe_ab", "--out", str(out), *extra])
    [entry] = json.loads(out.read_text())["checks"]
    return code, capsys.readouterr().out, entry


@pytest.mark.slow  # ~40 s: two short trainings
def test_recipe_ab_trains_both_recipes_and_reports_their_bpb_ratio(tmp_path, capsys, ab_workspace):
    data, tokenizer = ab_workspace
    code, stdout, entry = run_recipe_ab(tmp_path, capsys, "--data", str(data), "--tokenizer", str(tokenizer))
    assert code == 0 and status_lines(stdout) == {"recipe_ab": "PASS"}, stdout
    f = entry["figures"]
    # below log2(265) = 8.05, a uniform guess over the byte-level vocabulary: both runs learned something
    assert all(math.isfinite(f[k]) and 0 < f[k] < 8 for k in ("bpb_old", "bpb_new")), f
    assert f["bpb_ratio_new_over_old"] == f["bpb_new"] / f["bpb_old"]
    assert f["bpb_diff_new_minus_old"] == f["bpb_new"] - f["bpb_old"]
    assert f["steps_old"] > 1 and f["steps_new"] > 1 and f["tok_per_s_old"] > 0 and f["tok_per_s_new"] > 0
    assert f["evaluations_old"] >= 1 and f["evaluations_new"] >= 1
    assert f"2025-10 {f['bpb_old']:.4f} bpb" in entry["message"] and f"2026 {f['bpb_new']:.4f} bpb" in entry["message"]
    assert f"new/old {f['bpb_ratio_new_over_old']:.4f}" in entry["message"]
    for recipe in ("2025-10", "2026"):  # each run's whole log beside the JSON
        log = (tmp_path / "out" / f"gpu_check.recipe_ab.{recipe}.log").read_text()
        assert f"recipe {recipe}:" in log and "training done:" in log


def test_recipe_ab_fails_with_the_run_s_output_when_training_fails(tmp_path, capsys, ab_workspace):
    _, tokenizer = ab_workspace
    broken = tmp_path / "broken"
    broken.mkdir()
    for shard in range(2):  # named like shards, but not parquet: reading them fails
        (broken / f"shard_{shard:05d}.parquet").write_bytes(b"not a parquet file")
    code, stdout, entry = run_recipe_ab(tmp_path, capsys, "--data", str(broken), "--tokenizer", str(tokenizer))
    assert code == 1 and status_lines(stdout) == {"recipe_ab": "FAIL"}, stdout
    assert entry["message"].startswith("recipe 2025-10 exited ") and "gpu_check.recipe_ab.2025-10.log" in entry["message"]
    assert "parquet" in entry["message"].lower()  # the tail of the run's output says what went wrong
    assert not (tmp_path / "out" / "gpu_check.recipe_ab.2026.log").exists()  # the second run is not started after a failure


def test_recipe_ab_without_data_skips_saying_what_to_pass(tmp_path, capsys):
    code, stdout, entry = run_recipe_ab(tmp_path, capsys)
    assert code == 0 and status_lines(stdout) == {"recipe_ab": "SKIP"}
    assert "pass --data DIR" in entry["message"] and "--tokenizer DIR" in entry["message"]


def test_recipe_ab_trains_a_tokenizer_from_the_data_when_none_is_given(tmp_path, ab_workspace):
    data, _ = ab_workspace
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.SMOKE, True, "aot_eager", workdir=tmp_path / "work",
                            data=data, log_dir=tmp_path)
    folder, words = gpu_check.ab_tokenizer(ctx)
    assert folder is not None, words
    assert Tokenizer.load(folder).get_vocab_size() == gpu_check.SMOKE.ab_vocab
    assert f"a {gpu_check.SMOKE.ab_vocab:,}-token tokenizer trained here" in words


# ---------------------------------------------------------------- memory items


def test_missing_estimator_is_a_skip_not_a_crash(monkeypatch):
    import nanochat.memory

    monkeypatch.delattr(nanochat.memory, "measure_training_memory", raising=False)
    estimate = gpu_check.memory_estimate(gpu_check.big_config(gpu_check.SMOKE), 2, 128, torch.bfloat16)
    assert (estimate.total, estimate.status, estimate.note) == (None, "SKIP", "SKIP (estimate unavailable)")
    run = {"batch": 2, "estimate": estimate, "tok_per_s": 100.0, "mfu": None, "step_s": 0.1, "first_step_s": 1.0,
           "peak": Peak(3 * GIB, 3 * GIB, 4 * GIB)}
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


# ---------------------------------------------------------------- without the project; the new checks


def test_the_module_imports_nothing_of_the_project():
    code = ("import sys; sys.path.insert(0, '.'); import bench.gpu_check; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'nanochat', 'sharing', 'tasks', 'serving'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_when_the_project_does_not_import_the_header_and_matmul_still_run(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.split(".")[0] in ("nanochat", "sharing")] + ["nanochat"]:
        monkeypatch.setitem(sys.modules, name, None)  # every project import now fails, as on a machine without rustbpe
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--only", "bf16_matmul,chunked_loss", "--out", str(out)]) == 1
    stdout = capsys.readouterr().out
    assert status_lines(stdout) == {"bf16_matmul": "PASS", "chunked_loss": "FAIL"}
    assert "project: import failed: ModuleNotFoundError" in stdout and f"torch: {torch.__version__}" in stdout
    checks = json.loads(out.read_text())["checks"]
    assert checks[0]["figures"]["tflops"] > 0 and "no peak to compare (project import failed" in checks[0]["message"]
    assert "ModuleNotFoundError" in checks[1]["message"]


@pytest.mark.parametrize("peak, status", [(1e9, "PASS"), (1e18, "FAIL")], ids=["above-half", "below-half"])
def test_bf16_matmul_is_judged_against_half_the_datasheet_peak(monkeypatch, peak, status):
    monkeypatch.setattr(hardware, "peak_flops", lambda device, dtype: (peak, "datasheet"))
    outcome = gpu_check.check_bf16_matmul(gpu_check.Context(torch.device("cpu"), gpu_check.SMOKE, True, "aot_eager"))
    assert outcome.status == status and outcome.figures["fraction_of_peak"] == outcome.figures["tflops"] * 1e12 / peak


def test_attention_kernel_names_the_sdpa_backend_that_ran():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 16, 32)

    def attend():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    with sdpa_kernel(SDPBackend.MATH):
        assert gpu_check.sdpa_kernels(attend) == ["math"]
    outcome = gpu_check.check_attention_kernel(gpu_check.Context(torch.device("cpu"), gpu_check.SMOKE, True, "aot_eager"))
    assert outcome.status == "PASS" and outcome.figures["fused"] and "flash (CPU)" in outcome.message


def test_compiled_head_matches_eager_at_each_chunk_count():
    import dataclasses

    sizes = dataclasses.replace(gpu_check.SMOKE, head_chunk_counts=(1, 3))
    outcome = gpu_check.check_compiled_head(gpu_check.Context(torch.device("cpu"), sizes, True, "aot_eager"))
    assert outcome.status == "PASS", outcome.message
    assert "1 chunk(s)" in outcome.message and "3 chunk(s)" in outcome.message
    assert outcome.figures["c3_loss_rel"] <= gpu_check.HEAD_TOLERANCES[torch.bfloat16][0]


def test_peak_memory_words_put_reserved_beside_allocated():
    peak = Peak(allocated=6 * GIB, allocated_total=8 * GIB, reserved=10 * GIB)
    assert peak.words() == "peak allocated 6.00 GiB, reserved 10.00 GiB (1.25x the 8.00 GiB allocated in all)"
    assert peak.figures("b8_") == {"b8_peak_gib": 6.0, "b8_reserved_gib": 10.0, "b8_reserved_over_allocated": 1.25}


# ---------------------------------------------------------------- the MFU peak table


def test_peak_flops_is_unknown_off_cuda_and_outside_bf16():
    assert hardware.peak_flops(torch.device("cpu"), torch.bfloat16)[0] is None
    assert hardware.peak_flops(torch.device("cuda"), torch.float32)[0] is None


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),  # once matched as "H100": the SXM peak, MFU read 16% low
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GB10", 125e12),
    ("NVIDIA H100", None),  # a name not listed exactly gets no neighbour's peak
    ("Tesla T4", None),
])
def test_peak_flops_by_exact_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(hardware, "device_name", lambda device: name)
    flops, source = hardware.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert flops == peak and source
    if peak is None:
        assert "PEAK_BF16" in source  # says where to add it


def test_the_gb10_peak_says_it_is_derived(monkeypatch):
    monkeypatch.setattr(hardware, "device_name", lambda device: "NVIDIA GB10")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16)[1].startswith("DERIVED, not measured")
