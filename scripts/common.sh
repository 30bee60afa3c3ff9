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

# visible_gpus: how many CUDA devices torch sees (at least 1, so CPU runs one process)
visible_gpus() { python -c "import torch; print(max(1, torch.cuda.device_count()))"; }

# post_stage STAGE WHAT ARGS...: the shared body of midtrain.sh, sft.sh and rl.sh; the stage's
# entry point and predecessor come from the stage registry (nanochat.stages)
post_stage() {
  local stage="$1" what="$2" module from name
  module=$(python -m nanochat.stages module "$stage")
  from=$(python -m nanochat.stages starts-from "$stage")
  name=$(basename "$0" .sh)
  shift 2
  local gpus="" extra=()
  canonical_flags "$@"; set -- "${FLAGS[@]}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --gpus) gpus="$2"; shift 2 ;;
      -b|--batch-size) extra+=(--device-batch-size "$2"); shift 2 ;;
      -d|--depth) extra+=(--model-tag "d$2"); shift 2 ;;
      --resume|--fresh) extra+=("$1"); shift ;;
      --run) extra+=(--run "$2"); shift 2 ;;
      --no-eval) extra+=(--no-eval); shift ;;
      --eval-problems) extra+=(--eval-problems "$2"); shift 2 ;;
      -h|--help)
        cat <<USAGE
Usage: ./$name.sh [--gpus N] [-b N] [-d N] [--resume | --fresh] [--run NAME] [--no-eval] [--eval-problems N] [-- extra flags for $module]

$what, starting from the newest $from model,
then runs the chat evaluation and writes the report sections.
Safe to stop with Ctrl-C (a checkpoint is saved): run it again and it continues.

Options:
  --gpus N      processes/GPUs (default: all visible GPUs, 1 without GPU)
  -b, --batch-size N
                rows per forward pass per GPU (default: measured to fit)
  -d, --depth N the model of that depth (model tag dN; default: the newest)
  --resume      continue, and fail when there is no checkpoint to continue
                (default: continue a matching run when there is one, else start)
  --fresh       start at step 0, moving this stage's old run aside
  --run NAME    log to wandb under this run name
  --no-eval     skip the chat evaluation at the end
  --eval-problems N
                evaluate on N problems per task (quick)
  -h, --help    show this help
Everything after \`--\` goes to $module (python -m $module --help).
USAGE
        exit 0 ;;
      --) shift; extra+=("$@"); break ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
  done
  GPUS=${gpus:-$(visible_gpus)}
  step "$name ($GPUS process(es))"
  launch "$module" "${extra[@]}"
}
