"""Device/dtype choice, base dir, and torchrun-aware init (real gloo processes)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanochat import common

ROOT = Path(__file__).resolve().parents[1]


def test_base_dir_follows_env(base_dir):
    assert common.get_base_dir() == base_dir and base_dir.is_dir()


def test_base_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.get_base_dir() == tmp_path / ".cache" / "nanochat"


def test_device_autodetect_and_override():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert common.autodetect_device_type() == expected
    assert common.autodetect_device_type("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        common.autodetect_device_type("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_missing_device_is_an_error_and_cpu_computes_in_fp32():
    with pytest.raises(RuntimeError, match="not available"):
        common.autodetect_device_type("cuda")
    assert common.compute_dtype("cpu") == torch.float32
    assert not common.bf16_supported("cuda")


def test_single_process_init(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    info = common.compute_init("cpu", seed=3)
    assert (info.is_distributed, info.rank, info.world_size, info.is_master) == (False, 0, 1, True)
    first = torch.rand(2)
    common.compute_init("cpu", seed=3)
    assert torch.equal(first, torch.rand(2))


def test_torchrun_two_processes_gloo(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from nanochat.common import compute_init, compute_cleanup, print0
        info = compute_init("cpu")
        t = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(t)
        print0(f"world={info.world_size} sum={t.item():.0f} backend={dist.get_backend()}")
        print(f"rank {info.rank} local {info.local_rank} master={info.is_master}", flush=True)
        compute_cleanup()
    """))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("world=2 sum=3 backend=gloo") == 1  # printed by rank 0 only
    assert "rank 0 local 0 master=True" in out.stdout and "rank 1 local 1 master=False" in out.stdout


def test_environment_report_on_cpu(monkeypatch, base_dir):
    monkeypatch.setattr(common, "autodetect_device_type", lambda override=None: "cpu")
    report = common.environment_report()
    assert report["python"] == platform.python_version() and report["torch"] == torch.__version__
    assert report["device"] == f"cpu ({os.cpu_count()} cores)" and report["bf16"].startswith("no (fp32 compute")
    assert ("runs bf16 natively" in report["bf16"]) == common.cpu_bf16_native()
    assert report["artifacts"] == str(base_dir)


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True), (False, False)])
def test_cpu_bf16_native_reads_torchs_cpu_capabilities(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert common.cpu_bf16_native() is (avx512_bf16 or amx)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert common.cpu_bf16_native() is False  # a torch without the helper: the safe answer


def test_setup_script_help_and_bad_flag():
    ok = subprocess.run(["bash", "setup.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "--cpu" in ok.stdout and "--check" in ok.stdout
    bad = subprocess.run(["bash", "setup.sh", "--nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
