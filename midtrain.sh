#!/usr/bin/env bash
# Midtrain the base model on conversations (chat format, tool use, multiple choice), then evaluate it (scripts.chat_eval).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"

usage() {
  cat <<'USAGE'
Usage: ./midtrain.sh [--gpus N] [--resume] [--run NAME] [-- extra flags for scripts.mid_train]

Midtrain the base model on conversations (chat format, tool use, multiple choice), starting from the newest base model,
then runs the chat evaluation and writes the report sections.
Safe to stop with Ctrl-C (a checkpoint is saved); --resume continues.

Options:
  --gpus N      processes/GPUs (default: all visible GPUs, 1 without GPU)
  --resume      continue from this stage's newest complete checkpoint
  --run NAME    log to wandb under this run name
  -h, --help    show this help
Everything after `--` goes to scripts.mid_train (python -m scripts.mid_train --help).
USAGE
}

GPUS=""; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS="$2"; shift 2 ;;
    --resume) EXTRA+=(--resume); shift ;;
    --run) EXTRA+=(--run "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[ -n "$GPUS" ] || GPUS=$(visible_gpus)

step "midtrain ($GPUS process(es))"
launch scripts.mid_train "${EXTRA[@]}"
