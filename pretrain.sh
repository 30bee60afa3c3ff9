#!/usr/bin/env bash
# Pretrain the base model (scripts.base_train), then measure it (scripts.base_loss).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"

usage() {
  cat <<'USAGE'
Usage: ./pretrain.sh [options] [-- extra base_train flags]

Trains the base model on the shards prepare.sh fetched, checkpointing to
$NANOCHAT_BASE_DIR/base_checkpoints/d<depth>/, then reports bits per byte on
the train and validation splits (scripts.base_loss) and the CORE score
(scripts.base_eval, when the evaluation bundle is present). Safe to stop with Ctrl-C:
it saves a checkpoint first, and running it again continues from there (a
checkpoint made with other settings is refused; --fresh starts over).

Options:
  -d, --depth N    transformer layers; width and steps follow (default 20, or chosen by --time-budget)
  --time-budget D  pretrain for D, evaluations included (90m, 2.5h, 3d): without --depth it measures
                   the step at a few depths and picks the compute-optimal one; with --depth it keeps
                   that depth and sets the steps from the time
  -b, --batch-size N
                   rows per forward pass per GPU (default: 32, or the largest power of
                   two below it whose measured training step fits in memory)
  --run NAME       log to wandb under this run name (default: no wandb)
  --resume         continue, and fail when there is no checkpoint to continue
  --fresh          start at step 0, moving the old run aside (d<depth>.old-<time>)
  --eval-tokens N  tokens per validation / base-loss evaluation (default: base_train's and base_loss's)
  --no-core        skip the CORE evaluation (speedrun.sh runs it as a stage of its own)
  --gpus N         processes/GPUs on this machine (default: all visible GPUs, 1 without GPU)
  --nnodes N       machines in the run (default 1); with --node-rank and --master-addr
  --node-rank R    this machine's index, 0 on the machine given as --master-addr
  --master-addr A  address of node 0, the same on every node (required with --nnodes > 1);
                   port via --master-port (29500)
  -h, --help       show this help
Everything after `--` goes to scripts.base_train (python -m scripts.base_train --help).
Example: ./pretrain.sh --depth 12 -- --num-iterations 2000 --eval-every 200
         ./pretrain.sh --time-budget 60h
USAGE
}

DEPTH=""; BUDGET=""; BATCH=""; RUN=""; RESUME=""; CORE=1; EVAL_TOKENS=""; GPUS=""; NNODES=1; NODE_RANK=0; MASTER_ADDR=""; MASTER_PORT=29500
EXTRA=()
canonical_flags "$@"; set -- "${FLAGS[@]}"
while [ $# -gt 0 ]; do
  case "$1" in
    -d|--depth) DEPTH="$2"; shift 2 ;;
    --time-budget) BUDGET="$2"; shift 2 ;;
    -b|--batch-size) BATCH="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --resume|--fresh) [ -z "$RESUME" ] || die "--resume and --fresh exclude each other"; RESUME="$1"; shift ;;
    --eval-tokens) EVAL_TOKENS="$2"; shift 2 ;;
    --no-core) CORE=0; shift ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
check_nodes

# a malformed duration fails now, with base_train's message, not after the GPU count and the shard check
[ -z "$BUDGET" ] || python -m nanochat.budget check "$BUDGET" || exit 2
[ -n "$GPUS" ] || GPUS=$(visible_gpus)
PIDFILE="$NANOCHAT_BASE_DIR/logs/download.pid"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "note: the background shard download is still running; training reads new shards as they arrive"
fi

# with a time budget and no depth, base_train measures and picks the depth, so none is passed
TRAIN_ARGS=(); LOSS_ARGS=()
if [ -n "$BUDGET" ]; then TRAIN_ARGS+=(--time-budget "$BUDGET"); fi
if [ -n "$DEPTH" ] || [ -z "$BUDGET" ]; then DEPTH=${DEPTH:-20}; TRAIN_ARGS+=(--depth "$DEPTH"); fi
# unset: base_train measures its step and picks the batch (the log says why); base_loss keeps its own default
[ -n "$BATCH" ] && TRAIN_ARGS+=(--device-batch-size "$BATCH") && LOSS_ARGS+=(--device-batch-size "$BATCH")
[ -n "$RUN" ] && TRAIN_ARGS+=(--run "$RUN")
[ -n "$RESUME" ] && TRAIN_ARGS+=("$RESUME")
if [ -n "$EVAL_TOKENS" ]; then TRAIN_ARGS+=(--eval-tokens "$EVAL_TOKENS"); LOSS_ARGS+=(--split-tokens "$EVAL_TOKENS"); fi
TRAIN_ARGS+=("${EXTRA[@]}")

step "pretraining: depth ${DEPTH:-chosen by the $BUDGET time budget}, device batch ${BATCH:-auto}, $GPUS process(es) x $NNODES node(s)"
launch scripts.base_train "${TRAIN_ARGS[@]}"

step "base model loss"
launch scripts.base_loss "${LOSS_ARGS[@]}"
if [ "$CORE" = 1 ]; then
  # node 0's bundle decides for every node: a node that skipped the step would leave the others at its rendezvous
  if node0_has "${NANOCHAT_EVAL_BUNDLE:-$NANOCHAT_BASE_DIR/eval_bundle}"; then
    step "base model CORE"
    launch scripts.base_eval
  else
    echo "skipping CORE: no evaluation bundle (python -m nanochat.eval_bundle, then python -m scripts.base_eval)"
  fi
fi
echo
echo "base model ready in $NANOCHAT_BASE_DIR/$(python -m nanochat.stages folder base)/"
