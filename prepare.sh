#!/usr/bin/env bash
# Data and tokenizer: download (or import) pretraining shards, train and evaluate the tokenizer.
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"

usage() {
  cat <<'USAGE'
Usage: ./prepare.sh [options]

Fetches the first FineWeb-EDU shards (plus the validation shard), starts the rest of
the pretraining download in the background, then trains and evaluates the tokenizer.
Everything lands in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).

Options:
  --shards N          training shards to fetch before the tokenizer is trained (default 8)
  --total-shards N    shards to fetch in the background for pretraining (default 240,
                      enough for depth 20; 0 to skip)
  --from PATH         import your own corpus (.txt/.jsonl/.parquet file or folder) instead
                      of downloading; no background download then
  --vocab-size N      tokenizer vocabulary (default 65536)
  --max-chars N       characters of training text for the tokenizer (default 2000000000)
  --retrain-tokenizer train the tokenizer again even if one exists
  --offline           download nothing (with --from); the evaluation bundle and
                      post-training data must then come from local files
  --no-wandb          do not offer `wandb login`
  -h, --help          show this help
The download log is $NANOCHAT_BASE_DIR/logs/download.log.
USAGE
}

SHARDS=8; TOTAL_SHARDS=240; SOURCE=""; VOCAB=65536; MAX_CHARS=2000000000; RETRAIN=0; WANDB=1; OFFLINE=0
canonical_flags "$@"; set -- "${FLAGS[@]}"
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) SHARDS="$2"; shift 2 ;;
    --total-shards) TOTAL_SHARDS="$2"; shift 2 ;;
    --from) SOURCE="$2"; shift 2 ;;
    --vocab-size) VOCAB="$2"; shift 2 ;;
    --max-chars) MAX_CHARS="$2"; shift 2 ;;
    --retrain-tokenizer) RETRAIN=1; shift ;;
    --offline) OFFLINE=1; shift ;;
    --no-wandb) WANDB=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

step "pretraining data"
if [ "$OFFLINE" = 1 ] && [ -z "$SOURCE" ]; then
  die "--offline needs --from PATH (a local corpus)"
fi
if [ -n "$SOURCE" ]; then
  if python -c "import sys; from nanochat.dataset import list_shards; sys.exit(0 if list_shards() else 1)"; then
    echo "shards already present in $NANOCHAT_BASE_DIR/base_data; keeping them (remove the folder to re-import)"
  else
    python -m nanochat.dataset --from "$SOURCE"
  fi
else
  python -m nanochat.dataset -n "$SHARDS"
  PIDFILE="$NANOCHAT_BASE_DIR/logs/download.pid"
  if [ "$TOTAL_SHARDS" -gt "$SHARDS" ]; then
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "background download already running (pid $(cat "$PIDFILE"))"
    else
      nohup python -m nanochat.dataset -n "$TOTAL_SHARDS" > "$NANOCHAT_BASE_DIR/logs/download.log" 2>&1 &
      echo $! > "$PIDFILE"
      echo "downloading $TOTAL_SHARDS shards in the background (pid $!, log: $NANOCHAT_BASE_DIR/logs/download.log)"
    fi
  fi
fi

step "tokenizer"
if [ "$RETRAIN" = 0 ] && python -c "from nanochat.tokenizer import get_tokenizer; get_tokenizer()" 2>/dev/null; then
  echo "tokenizer already trained in $NANOCHAT_BASE_DIR/tokenizer (--retrain-tokenizer to redo)"
else
  python -m scripts.tok_train --vocab-size "$VOCAB" --max-chars "$MAX_CHARS"
fi
python -m scripts.tok_eval

if [ "$OFFLINE" = 0 ]; then
  step "evaluation bundle and post-training data"
  # Not fatal: pretraining doesn't need them, and each can be fetched again later.
  python -m nanochat.eval_bundle || echo "warning: no CORE evaluation bundle yet; retry with: python -m nanochat.eval_bundle"
  python -m tasks.fetch || echo "warning: identity/spelling data missing; retry with: python -m tasks.fetch"
fi

if [ "$WANDB" = 1 ] && [ -t 0 ] && python -c "import wandb" 2>/dev/null; then
  if [ -z "${WANDB_API_KEY:-}" ] && ! grep -q "api.wandb.ai" "$HOME/.netrc" 2>/dev/null; then
    step "wandb (optional: Ctrl-C skips it)"
    trap 'echo; echo "skipping wandb login"' INT
    wandb login || echo "continuing without wandb"
    trap - INT
  fi
fi

step "done"
echo "data: $NANOCHAT_BASE_DIR/base_data   tokenizer: $NANOCHAT_BASE_DIR/tokenizer"
echo "next: ./pretrain.sh"
