# Sourced by the stage scripts (prepare.sh, pretrain.sh, ...): finds the Python
# environment, loads what setup.sh wrote for this machine, and defines helpers.
NANOCHAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$NANOCHAT_ROOT/.venv/bin/python" ]; then
  # shellcheck disable=SC1091
  source "$NANOCHAT_ROOT/.venv/bin/activate"
  if [ -f "$NANOCHAT_ROOT/.venv/nanochat_env.sh" ]; then
    # shellcheck disable=SC1091
    source "$NANOCHAT_ROOT/.venv/nanochat_env.sh"
  fi
elif ! python -c "import nanochat" >/dev/null 2>&1; then
  echo "error: no .venv in $NANOCHAT_ROOT and nanochat is not importable; run ./setup.sh first" >&2
  exit 1
fi
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR/logs"
cd "$NANOCHAT_ROOT" || exit 1

# shellcheck source=scripts/flags.sh
source "$NANOCHAT_ROOT/scripts/flags.sh"

die() { echo "error: $*" >&2; exit 1; }
step() { echo; echo "== $* ($(date '+%H:%M:%S'))"; }

# launch MODULE ARGS...: python -m MODULE on one process, or torchrun when GPUS > 1 or NNODES > 1
# (GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT are set by the calling stage script).
launch() {
  if [ "${GPUS:-1}" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
    if [ "${NNODES:-1}" -gt 1 ]; then
      torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        --nproc-per-node "$GPUS" -m "$@"
    else
      torchrun --standalone --nproc-per-node "$GPUS" -m "$@"
    fi
  else
    python -m "$@"
  fi
}

# check_nodes: the multi-node flags make sense, before anything starts (exit 2 otherwise). Several nodes
# need node 0's address given alike on every node: a default of this machine would have each node wait
# for a rendezvous of its own.
check_nodes() {
  [[ "${NNODES:-1}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nnodes must be a positive whole number, not '${NNODES}'" >&2; exit 2; }
  [[ "${NODE_RANK:-0}" =~ ^[0-9]+$ ]] && [ "${NODE_RANK:-0}" -lt "${NNODES:-1}" ] \
    || { echo "error: --node-rank must be 0 to $(( ${NNODES:-1} - 1 )) with --nnodes ${NNODES:-1}, not '${NODE_RANK}'" >&2; exit 2; }
  if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: --nnodes $NNODES needs --master-addr: node 0's address, the same on every node" >&2
    exit 2
  fi
}

# node0_has PATH: whether PATH exists on node 0, the one answer every node acts on, so that all nodes
# launch the same steps (a step one node skips leaves the others waiting at its rendezvous). With
# several nodes, asked through a rendezvous of one process per node (python -m nanochat.common node0-has).
node0_has() {
  if [ "${NNODES:-1}" -gt 1 ]; then
    local answer
    answer=$(GPUS=1 launch nanochat.common node0-has "$1") || die "the nodes could not agree whether $1 exists on node 0"
    [ "$(tail -n 1 <<<"$answer")" = yes ]
  else
    [ -e "$1" ]
  fi
}

# visible_gpus: how many CUDA devices torch sees (at least 1, so CPU runs one process)
visible_gpus() { python -c "import torch; print(max(1, torch.cuda.device_count()))"; }

# post_stage MODULE ARGS...: the body of midtrain.sh, sft.sh and rl.sh. The entry point parses every flag
# (python -m MODULE --help lists them, short forms and the original's spellings included); this only takes
# the launch flag --gpus N (before any `--`) and starts MODULE on that many processes.
post_stage() {
  local module="$1" gpus="" args=()
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --gpus) [ $# -ge 2 ] || die "--gpus needs a number"; gpus="$2"; shift 2 ;;
      --gpus=*) gpus="${1#*=}"; shift ;;
      -h|--help) exec python -m "$module" --help ;;
      --) args+=("$@"); break ;;
      *) args+=("$1"); shift ;;
    esac
  done
  GPUS=${gpus:-$(visible_gpus)}
  step "$(basename "$0" .sh) ($GPUS process(es))"
  launch "$module" "${args[@]}"
}
