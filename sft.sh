#!/usr/bin/env bash
# Supervised finetuning on conversations, then evaluate it (scripts.chat_eval).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"

usage() {
  cat <<'USAGE'
Usage: ./sft.sh [--gpus N] [--resume] [--run NAME] [-- extra flags for scripts.chat_sft]

Supervised finetuning on conversations, starting from the newest mid model,
then runs the chat evaluation and writes the report sections.
Safe to stop with Ctrl-C (a checkpoint is saved); --resume continues.

Options:
  --gpus N      processes/GPUs (default: all visible GPUs, 1 without GPU)
  --resume      continue from this stage's newest complete checkpoint
  --run NAME    log to wandb under this run name
  -h, --help    show this help
Everything after `--` goes to scripts.chat_sft (python -m scripts.chat_sft --help).
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

step "sft ($GPUS process(es))"
launch scripts.chat_sft "${EXTRA[@]}"
