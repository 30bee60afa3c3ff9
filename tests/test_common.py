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


# ---------------------------------------------------------------- the exit-code policy (nanochat.training.run_guarded)

def _raising(exc: BaseException):
    def work(info):
        raise exc
    return work


@pytest.mark.parametrize("exc, code, said", [
    (__import__("nanochat.checkpoint", fromlist=["x"]).CheckpointError("no checkpoint found in /x"), 2, "error: no checkpoint found in /x"),
    (common.DataError("no shards in /d"), 2, "error: no shards in /d"),
    (FileNotFoundError("tokenizer.pkl"), 2, "error: tokenizer.pkl"),
    (__import__("nanochat.runtime", fromlist=["x"]).MemoryRefusal("refusing to start"), 3, "error: refusing to start"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 3, "error: out of memory at --device-batch-size 8; run again with --device-batch-size 4"),
])
def test_each_kind_of_error_has_its_exit_code_and_one_line(monkeypatch, capsys, exc, code, said):
    from nanochat.training import run_guarded

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert run_guarded(_raising(exc), device="cpu", device_batch=lambda: 8) == code
    out = capsys.readouterr().out
    assert out.startswith(said) and out.count("\n") == 1, out
    assert run_guarded(lambda info: 0, device="cpu") == 0


def test_a_bug_keeps_its_traceback_and_an_out_of_memory_without_a_batch_still_says_what_to_do(monkeypatch, capsys):
    from nanochat.training import run_guarded

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ZeroDivisionError):
        run_guarded(_raising(ZeroDivisionError("oops")), device="cpu")
    assert capsys.readouterr().out == "error: ZeroDivisionError: oops (a bug: traceback below)\n"
    assert run_guarded(_raising(torch.OutOfMemoryError("x")), device="cpu") == 3
    assert "smaller --device-batch-size" in capsys.readouterr().out


def test_every_rank_names_itself_and_a_failing_rank_does_not_wait_for_the_others(tmp_path):
    """Rank 1 fails while rank 0 waits in a collective rank 1 never joins: rank 1 says so with its rank and
    leaves at once (no cleanup barrier); rank 0's collective then fails, and both exit within seconds."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from nanochat.training import run_guarded

        def work(info):
            if info.rank == 1:
                raise FileNotFoundError("no tokenizer on this node")
            dist.all_reduce(torch.ones(1))  # rank 1 never comes
            return 0

        sys.exit(run_guarded(work, device="cpu"))
    """))
    from child import Child

    with Child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe)], cwd=ROOT) as run:
        assert run.finish(timeout=60) != 0  # the old cleanup barrier waited here for the 30-minute gloo timeout
    assert "[rank 1/2] error: no tokenizer on this node" in run.output, run.output[-3000:]
