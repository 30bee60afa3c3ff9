#!/usr/bin/env bash
# Create .venv and install nanochat with the torch build that fits this machine.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
Usage: ./setup.sh [--cpu] [--check] [--help]

Creates .venv (Python 3.10+) and installs this project with the torch build
that fits the machine:
  DGX Spark (aarch64 + NVIDIA GB10)  torch for CUDA 13.0 (cu130), plus the CUDA 13
                                     environment Triton/torch.compile need on sm_121
  any other NVIDIA GPU               a CUDA build matching the driver (cu130/cu128/cu126)
  no GPU                             the CPU build
The environment for the stage scripts is written to .venv/nanochat_env.sh, which
every stage script sources. Running it again is fast and changes nothing unless
pyproject.toml or the chosen build changed.

Options:
  --cpu     install the CPU build even when a GPU is present
  --check   only report what was found and what is missing; change nothing
Both exit 1 when nvidia-smi lists a GPU that the torch in .venv cannot use.
  --help    show this help
Environment:
  TORCH_VERSION   torch release to install (default 2.13.0)
  PYTHON          interpreter used to create .venv (default python3)
EOF
}

FORCE_CPU=0
CHECK_ONLY=0
source scripts/flags.sh
canonical_flags "$@"
for arg in "${FLAGS[@]}"; do
  case "$arg" in
    --cpu) FORCE_CPU=1 ;;
    --check) CHECK_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
ENV_FILE="$VENV/nanochat_env.sh"
STAMP="$VENV/.nanochat-setup"

# ---------------------------------------------------------------- detect
GPU_NAME=""
DRIVER_CUDA=""
if [ "$FORCE_CPU" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  # Without a working driver nvidia-smi prints its complaint on stdout and fails: that is no GPU.
  if GPU_LIST=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null); then
    GPU_NAME=$(head -n1 <<<"$GPU_LIST")
    DRIVER_CUDA=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n1 || true)
  fi
fi
ARCH=$(uname -m)

if [ -z "$GPU_NAME" ]; then
  KIND=cpu; TORCH_INDEX=cpu
elif [[ "$GPU_NAME" == *GB10* && "$ARCH" == aarch64 ]]; then
  KIND=spark; TORCH_INDEX=cu130
else
  KIND=cuda
  case "${DRIVER_CUDA%%.*}" in
    ""|1[0-1]) TORCH_INDEX=cu126 ;;
    12) if [ "${DRIVER_CUDA#12.}" -ge 8 ] 2>/dev/null; then TORCH_INDEX=cu128; else TORCH_INDEX=cu126; fi ;;
    *) TORCH_INDEX=cu130 ;;
  esac
fi
TORCH_INDEX_URL="https://download.pytorch.org/whl/$TORCH_INDEX"

find_cuda_home() {
  for d in "${CUDA_HOME:-}" /usr/local/cuda-13.0 /usr/local/cuda-13 /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/ptxas" ]; then echo "$d"; return; fi
  done
}

write_env_file() {
  local tmp="$ENV_FILE.tmp"
  {
    echo "# Written by setup.sh for a '$KIND' machine; sourced by every stage script."
    if [ "$KIND" = spark ]; then
      local cuda_home; cuda_home=$(find_cuda_home)
      if [ -n "$cuda_home" ]; then
        echo "export CUDA_HOME=$cuda_home"
        echo 'export PATH="$CUDA_HOME/bin:$PATH"'
        echo "# Not LD_LIBRARY_PATH: torch loads CUDA's libraries from its nvidia-* wheels through its RUNPATH, which"
        echo "# LD_LIBRARY_PATH precedes; \$CUDA_HOME/lib64 there would load the system's cuBLAS/nvJitLink instead."
        echo "# Triton's bundled ptxas does not know sm_121a; CUDA 13's does. Triton >= 3.5 takes the ptxas for"
        echo "# sm_100 and newer from TRITON_PTXAS_BLACKWELL_PATH (knobs.nvidia.ptxas_blackwell), older ones from TRITON_PTXAS_PATH."
        echo 'export TRITON_PTXAS_BLACKWELL_PATH="$CUDA_HOME/bin/ptxas"'
        echo 'export TRITON_PTXAS_PATH="$CUDA_HOME/bin/ptxas"'
      else
        echo "# CUDA 13.0 toolkit not found: torch.compile will fail on sm_121 until it is installed."
      fi
      echo "# Unified memory: segments that grow in place (PyTorch docs, CUDA semantics, PYTORCH_CUDA_ALLOC_CONF:"
      echo "# expandable_segments is for allocation sizes that change) instead of max_split_size_mb, which left the"
      echo "# head's 640 MiB and 1 GiB blocks unsplittable. On two Sparks it kept 6-7 GiB more memory available"
      echo "# (huggingface.co/nvidia/GLM-5.3-Flash-FP4-Local discussion 7); NVIDIA's NeMo tuning guide puts it first."
      echo 'export PYTORCH_ALLOC_CONF="${PYTORCH_ALLOC_CONF:-expandable_segments:True}"'
    fi
    echo 'export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"'
  } > "$tmp"
  mv "$tmp" "$ENV_FILE"
}

# A GPU that nvidia-smi lists but .venv's torch cannot use (a build for a newer CUDA than the driver's, or a
# CPU build) would make every stage train on the CPU in fp32 without an error: stop here instead.
check_torch_sees_gpu() {
  [ -n "$GPU_NAME" ] && [ -x "$VENV/bin/python" ] || return 0
  local seen torch_version torch_cuda usable
  seen=$("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", int(torch.cuda.is_available()))' 2>/dev/null) || return 0
  read -r torch_version torch_cuda usable <<<"$seen"
  [ "$usable" = 1 ] && return 0
  cat >&2 <<EOF
setup.sh: nvidia-smi lists '$GPU_NAME' (driver CUDA ${DRIVER_CUDA:-unknown}), but torch $torch_version in $VENV
cannot use it (torch.cuda.is_available() is False; torch built for CUDA $torch_cuda): the stages would train on the CPU.
  fix:  a driver whose nvidia-smi shows "CUDA Version" $torch_cuda or newer, then: rm -rf $VENV && ./setup.sh
  or:   ./setup.sh --cpu   to train on the CPU on purpose
EOF
  exit 1
}

report() {
  echo "machine: $ARCH, ${GPU_NAME:-no NVIDIA GPU}${DRIVER_CUDA:+ (driver CUDA $DRIVER_CUDA)} -> torch $TORCH_VERSION from $TORCH_INDEX"
  if [ "$KIND" = spark ]; then
    local cuda_home; cuda_home=$(find_cuda_home)
    echo "CUDA 13 toolkit: ${cuda_home:-MISSING (install cuda-toolkit-13-0; needed for torch.compile/Triton)}"
  fi
  if [ -x "$VENV/bin/python" ]; then
    "$VENV/bin/python" -m nanochat.common 2>/dev/null || echo ".venv exists but nanochat is not importable: run ./setup.sh"
  else
    echo ".venv: missing (run ./setup.sh)"
  fi
}

if [ "$CHECK_ONLY" = 1 ]; then report; check_torch_sees_gpu; exit 0; fi

# ---------------------------------------------------------------- install
WANT="torch=$TORCH_VERSION index=$TORCH_INDEX pyproject=$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import torch, nanochat" 2>/dev/null; then
  echo "setup: .venv is up to date ($WANT)"
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  echo "setup: installing torch $TORCH_VERSION ($TORCH_INDEX)"
  # The torch index carries torch's own dependencies; PyPI the rest. --retries 0 keeps an
  # unreachable torch index (offline mirrors) from stalling before local wheels are tried.
  "${PIP[@]}" --retries 0 --timeout 30 "torch==$TORCH_VERSION" \
    --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
  echo "setup: installing nanochat and its dependencies"
  "${PIP[@]}" -e '.[dev]'
  echo "$WANT" > "$STAMP"
fi
write_env_file
check_torch_sees_gpu
echo
echo "setup complete:"
report
echo
echo "next: ./prepare.sh   (data + tokenizer), then ./pretrain.sh"
