"""setup.sh's machine detection, with fake nvidia-smi and uname on PATH, or no nvidia-smi at all: --check changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

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


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_other_nvidia_gpus_follow_the_driver(tmp_path):
    assert "from cu128" in check(fake_tools(tmp_path / "a", "NVIDIA H100 80GB HBM3", "x86_64", "12.9"))
    assert "from cu126" in check(fake_tools(tmp_path / "b", "NVIDIA A100-SXM4-40GB", "x86_64", "12.4"))
    assert "from cu130" in check(fake_tools(tmp_path / "c", "NVIDIA H200", "x86_64", "13.0"))


def without_nvidia_smi(folder: Path) -> dict:
    """PATH = `folder`, holding links to everything in /usr/bin and /bin but nvidia-smi, so a host
    with a real GPU (and a real /usr/bin/nvidia-smi) runs this case too."""
    folder.mkdir()
    for directory in (Path("/usr/bin"), Path("/bin")):
        for tool in directory.iterdir():
            if tool.name != "nvidia-smi" and not (folder / tool.name).exists():
                (folder / tool.name).symlink_to(tool)
    return {**os.environ, "PATH": str(folder)}


def test_no_gpu_means_the_cpu_build(tmp_path):
    out = check(without_nvidia_smi(tmp_path / "bin"))
    assert "no NVIDIA GPU" in out and "from cpu" in out


def test_an_nvidia_smi_that_finds_no_driver_means_the_cpu_build(tmp_path):
    env = without_nvidia_smi(tmp_path / "bin")
    broken = tmp_path / "bin" / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n")
    broken.chmod(0o755)
    out = check(env)
    assert "no NVIDIA GPU" in out and "from cpu" in out
