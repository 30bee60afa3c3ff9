#!/usr/bin/env bash
# Data and tokenizer: download (or import) pretraining shards, train and evaluate the tokenizer.
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"

usage() {
  cat <<'USAGE'
Usage: ./prepare.sh [options]

Fetches the first shards of the pretraining dataset (plus its validation shard), starts
the rest of the download in the background, then trains and evaluates the tokenizer on
them. Everything lands in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).

Options:
  --dataset NAME      fineweb-edu (the default) or climbmix; pretraining then reads it
                      without being told again (default: the one prepared last)
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

SHARDS=8; TOTAL_SHARDS=240; SOURCE=""; DATASET=(); VOCAB=65536; MAX_CHARS=2000000000; RETRAIN=0; WANDB=1; OFFLINE=0
canonical_flags "$@"; set -- "${FLAGS[@]}"
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) SHARDS="$2"; shift 2 ;;
    --total-shards) TOTAL_SHARDS="$2"; shift 2 ;;
    --from) SOURCE="$2"; shift 2 ;;
    --dataset) DATASET=(--dataset "$2"); shift 2 ;;
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
  python -m nanochat.dataset --from "$SOURCE" --keep-existing "${DATASET[@]}"
else
  python -m nanochat.dataset -n "$SHARDS" "${DATASET[@]}"
  PIDFILE="$NANOCHAT_BASE_DIR/logs/download.pid"
  if [ "$TOTAL_SHARDS" -gt "$SHARDS" ]; then
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "background download already running (pid $(cat "$PIDFILE"))"
    else
      nohup python -m nanochat.dataset -n "$TOTAL_SHARDS" "${DATASET[@]}" > "$NANOCHAT_BASE_DIR/logs/download.log" 2>&1 &
      echo $! > "$PIDFILE"
      echo "downloading $TOTAL_SHARDS shards in the background (pid $!, log: $NANOCHAT_BASE_DIR/logs/download.log)"
    fi
  fi
fi

step "tokenizer"
# trained again when the data changed (another --dataset, or --from after a download)
TOK_ARGS=(--vocab-size "$VOCAB" --max-chars "$MAX_CHARS"); [ "$RETRAIN" = 1 ] || TOK_ARGS+=(--skip-if-trained)
python -m scripts.tok_train "${TOK_ARGS[@]}"
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
echo "data: $(python -c 'from nanochat.shards import data_dir; print(data_dir())')   tokenizer: $NANOCHAT_BASE_DIR/tokenizer"
echo "next: ./pretrain.sh"
