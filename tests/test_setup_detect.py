"""setup.sh's machine detection, with fake nvidia-smi and uname on PATH, or no nvidia-smi at all: --check changes
nothing; a GPU that torch cannot use stops it with what to do; and the environment it writes for a DGX Spark, from a
copy of setup.sh whose .venv holds a fake python (so nothing is installed) and a fake CUDA 13 home."""

from __future__ import annotations

import hashlib
import os
import shutil
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
    # CUDA_VISIBLE_DEVICES="": .venv's torch sees no GPU here, even on a machine with one
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "CUDA_HOME": str(folder / "no-cuda-here"),
            "CUDA_VISIBLE_DEVICES": ""}


def check(env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "setup.sh", "--check"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def detected(env: dict) -> str:
    """What --check found, when a GPU is listed that .venv's torch (for the CPU here) cannot use: exit 1, saying so."""
    out = check(env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "torch.cuda.is_available() is False" in out.stderr and "./setup.sh --cpu" in out.stderr
    return out.stdout


def test_dgx_spark_gets_cu130_and_is_told_about_a_missing_cuda13(tmp_path):
    out = detected(fake_tools(tmp_path / "bin", "NVIDIA GB10", "aarch64", "13.0"))
    assert "NVIDIA GB10" in out and "from cu130" in out
    assert "CUDA 13 toolkit:" in out


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_other_nvidia_gpus_follow_the_driver(tmp_path):
    assert "from cu128" in detected(fake_tools(tmp_path / "a", "NVIDIA H100 80GB HBM3", "x86_64", "12.9"))
    assert "from cu126" in detected(fake_tools(tmp_path / "b", "NVIDIA A100-SXM4-40GB", "x86_64", "12.4"))
    assert "from cu130" in detected(fake_tools(tmp_path / "c", "NVIDIA H200", "x86_64", "13.0"))


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
    assert out.returncode == 0, out.stderr
    assert "no NVIDIA GPU" in out.stdout and "from cpu" in out.stdout


def test_an_nvidia_smi_that_finds_no_driver_means_the_cpu_build(tmp_path):
    env = without_nvidia_smi(tmp_path / "bin")
    broken = tmp_path / "bin" / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n")
    broken.chmod(0o755)
    out = check(env)
    assert out.returncode == 0, out.stderr
    assert "no NVIDIA GPU" in out.stdout and "from cpu" in out.stdout


# ---------------------------------------------------------------- a Spark's setup, nothing installed


def spark_checkout(tmp_path: Path, torch_sees_gpu: bool) -> tuple[Path, dict]:
    """A copy of setup.sh (and what it reads) whose .venv is up to date as far as setup.sh can tell: a fake
    python that imports anything and reports torch 2.13.0 for CUDA 13.0, seeing the GPU or not; a GB10 on
    aarch64 and a CUDA 13 home with a ptxas."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "pyproject.toml", "scripts/flags.sh"):
        shutil.copy(ROOT / name, checkout / name)
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *is_available*) echo "2.13.0 13.0 {int(torch_sees_gpu)}" ;; esac\n'
    )
    (venv_bin / "python").chmod(0o755)
    digest = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (checkout / ".venv" / ".nanochat-setup").write_text(f"torch=2.13.0 index=cu130 pyproject={digest}\n")
    env = fake_tools(tmp_path / "bin", "NVIDIA GB10", "aarch64", "13.0")
    cuda = tmp_path / "cuda-13.0"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "ptxas").write_text("#!/bin/sh\n")
    (cuda / "bin" / "ptxas").chmod(0o755)
    return checkout, {**env, "CUDA_HOME": str(cuda)}


def test_the_spark_environment_points_triton_at_cuda13_and_leaves_the_wheels_libraries_first(tmp_path):
    checkout, env = spark_checkout(tmp_path, torch_sees_gpu=True)
    out = subprocess.run(["bash", "setup.sh"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    env_file = checkout / ".venv" / "nanochat_env.sh"
    shown = subprocess.run(
        ["bash", "-c", f'source "{env_file}"; echo "$TRITON_PTXAS_BLACKWELL_PATH|$TRITON_PTXAS_PATH|$LD_LIBRARY_PATH|$PYTORCH_ALLOC_CONF"'],
        env={**env, "LD_LIBRARY_PATH": "/wheels/nvidia/lib"}, capture_output=True, text=True, check=True).stdout.strip()
    ptxas = env["CUDA_HOME"] + "/bin/ptxas"
    assert shown == f"{ptxas}|{ptxas}|/wheels/nvidia/lib|expandable_segments:True"


def test_a_gpu_torch_cannot_use_stops_setup_with_what_to_do(tmp_path):
    checkout, env = spark_checkout(tmp_path, torch_sees_gpu=False)
    out = subprocess.run(["bash", "setup.sh"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "setup complete" not in out.stdout
    assert "'NVIDIA GB10'" in out.stderr and "torch 2.13.0" in out.stderr and "built for CUDA 13.0" in out.stderr
    assert "rm -rf .venv && ./setup.sh" in out.stderr
