"""setup.sh's machine detection, with fake nvidia-smi and uname on PATH (no GPU here): --check changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_tools(folder: Path, gpu: str, arch: str, cuda: str) -> dict:
    folder.mkdir()
    (folder / "nvidia-smi").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--query-gpu=name*) echo "{gpu}" ;; *) echo "| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {cuda} |" ;; esac\n'
    )
    (folder / "uname").write_text(f"#!/bin/sh\necho {arch}\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "CUDA_HOME": str(folder / "no-cuda-here")}


def check(env: dict) -> str:
    out = subprocess.run(["bash", "setup.sh", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_dgx_spark_gets_cu130_and_is_told_about_a_missing_cuda13(tmp_path):
    out = check(fake_tools(tmp_path / "bin", "NVIDIA GB10", "aarch64", "13.0"))
    assert "NVIDIA GB10" in out and "from cu130" in out
    assert "CUDA 13 toolkit:" in out


def test_other_nvidia_gpus_follow_the_driver(tmp_path):
    assert "from cu128" in check(fake_tools(tmp_path / "a", "NVIDIA H100 80GB HBM3", "x86_64", "12.9"))
    assert "from cu126" in check(fake_tools(tmp_path / "b", "NVIDIA A100-SXM4-40GB", "x86_64", "12.4"))
    assert "from cu130" in check(fake_tools(tmp_path / "c", "NVIDIA H200", "x86_64", "13.0"))


def test_no_gpu_means_the_cpu_build(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    env = {**os.environ, "PATH": f"{folder}:/usr/bin:/bin"}
    assert "no NVIDIA GPU" in check(env) and "from cpu" in check(env)
