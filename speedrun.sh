#!/usr/bin/env bash
# The whole pipeline in one command: setup -> data + tokenizer -> pretrain -> CORE -> midtrain -> SFT -> RL
# -> chat eval -> report card. Finished stages are skipped, so running it again after a crash continues.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/flags.sh

usage() {
  cat <<'USAGE'
Usage: ./speedrun.sh [options]

Runs every stage in order; each one that already finished is skipped (markers in
$NANOCHAT_BASE_DIR/speedrun/), and an interrupted training stage resumes from its
newest checkpoint. On a DGX Spark the default depth-20 run takes days: use tmux.

Options:
  -d, --depth N    model depth (default 20; 4 with --tiny; chosen by --time-budget when it is given)
  --time-budget D  pretrain for D, evaluations included (90m, 2.5h, 3d; pretrain.sh --time-budget);
                   the later stages come on top, and their expected time is printed at the start
  -b, --batch-size N
                   rows per forward pass per GPU (default: measured to fit, at most 32; 16 with --tiny)
  --run NAME       log the training stages to wandb under this name
  --skip-rl        stop after SFT (no RL stage)
  --force STAGE    redo STAGE (prepare, pretrain, base-eval, mid, sft, rl, chat-eval);
                   its old checkpoints are moved aside, not deleted
  --tiny           a small model sized for a laptop CPU: every stage runs (4m42s on a 2-core
                   Xeon VM with AMX, bench/README.md; the model talks nonsense, the point
                   is the whole pipeline)
  --data PATH      pretrain on a local corpus (.txt/.jsonl/.parquet file or folder) and use
                   generated sample task files: no network needed
  --dataset NAME   pretrain on fineweb-edu (the default) or climbmix (prepare.sh --dataset)
  --smoke          (with --tiny) a few steps per stage of 4 rows only, for tests
  -h, --help       show this help
USAGE
}

DEPTH=""; BUDGET=""; BATCH=""; RUN=""; SKIP_RL=0; FORCE=""; TINY=0; DATA=""; DATASET=""; SMOKE=0
canonical_flags "$@"; set -- "${FLAGS[@]}"
while [ $# -gt 0 ]; do
  case "$1" in
    -d|--depth) DEPTH="$2"; shift 2 ;;
    --time-budget) BUDGET="$2"; shift 2 ;;
    -b|--batch-size) BATCH="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --skip-rl) SKIP_RL=1; shift ;;
    --force) FORCE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --data) DATA="$2"; shift 2 ;;
    --dataset) DATASET="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "speedrun.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
STAGES="prepare pretrain base-eval mid sft rl chat-eval"
if [ -n "$FORCE" ] && [[ " $STAGES " != *" $FORCE "* ]]; then
  echo "speedrun.sh: --force takes one of: $STAGES" >&2; exit 2
fi
if [ -n "$DATA" ] && [ ! -e "$DATA" ]; then
  echo "speedrun.sh: --data $DATA: no such file or folder" >&2; exit 2
fi
if [ -n "$DATA" ] && [ -n "$DATASET" ]; then
  echo "speedrun.sh: --data (your own corpus) and --dataset (one to download) exclude each other" >&2; exit 2
fi

# ---------------------------------------------------------------- sizes (one place)
DEPTH_GIVEN=$DEPTH
if [ "$TINY" = 1 ]; then
  if [ "$SMOKE" = 1 ]; then BATCH=${BATCH:-4}; fi
  DEPTH=${DEPTH:-4}; BATCH=${BATCH:-16}; SEQ=256; VOCAB=8192; TOK_CHARS=20000000
  PRE_STEPS=200; MID_STEPS=60; SFT_STEPS=60; RL_STEPS=8; EVAL_PROBLEMS=16; MAX_NEW=96; CORE_PER_TASK=16
  PRETRAIN_EVAL_TOKENS=(--eval-tokens 65536)
  if [ "$SMOKE" = 1 ]; then PRE_STEPS=3; MID_STEPS=2; SFT_STEPS=2; RL_STEPS=1; EVAL_PROBLEMS=2; MAX_NEW=8; CORE_PER_TASK=2; TOK_CHARS=2000000; PRETRAIN_EVAL_TOKENS=(--eval-tokens 2048); VOCAB=1024; fi
  PRE_ARGS=(-- --max-seq-len "$SEQ" --total-batch-size $((BATCH * SEQ)) --eval-every 100 --sample-every 0 --save-every 50)
  # a time budget sets the steps (and, unless -d was given, the depth) itself
  if [ -z "$BUDGET" ]; then PRE_ARGS+=(--num-iterations "$PRE_STEPS"); fi
  MID_ARGS=(--num-iterations "$MID_STEPS" --device-batch-size "$BATCH" --total-batch-size $((BATCH * SEQ)) --max-examples 4000 --eval-steps 4 --save-every 20 --no-eval)
  SFT_ARGS=(--num-iterations "$SFT_STEPS" --device-batch-size 4 --examples-per-step 8 --max-examples 1000 --eval-steps 4 --save-every 20 --no-eval)
  RL_ARGS=(--num-iterations "$RL_STEPS" --examples-per-step 4 --num-samples 4 --device-batch-size 8 --max-new-tokens "$MAX_NEW" --max-examples 200 --eval-every 0 --eval-examples 8 --no-eval)
  EVAL_ARGS=(--max-problems "$EVAL_PROBLEMS" --max-new-tokens "$MAX_NEW")
else
  # BATCH stays unset unless given: each stage then measures its step and picks a device batch that fits
  DEPTH=${DEPTH:-20}; VOCAB=65536; TOK_CHARS=2000000000; CORE_PER_TASK=""
  PRE_ARGS=(); MID_ARGS=(--no-eval); SFT_ARGS=(--no-eval); RL_ARGS=(--no-eval); EVAL_ARGS=(); PRETRAIN_EVAL_TOKENS=()
fi
# --depth goes to pretraining unless a time budget is to choose it
DEPTH_ARGS=(--depth "$DEPTH"); if [ -n "$BUDGET" ] && [ -z "$DEPTH_GIVEN" ]; then DEPTH_ARGS=(); fi
BUDGET_ARGS=(); if [ -n "$BUDGET" ]; then BUDGET_ARGS=(--time-budget "$BUDGET"); fi
RUN_ARGS=(); [ -n "$RUN" ] && RUN_ARGS=(--run "$RUN")
# --tiny installs the CPU build: one process, said outright, spares each stage script a Python start to count GPUs
PROCESS_ARGS=(); if [ "$TINY" = 1 ]; then PROCESS_ARGS=(--gpus 1); fi

# a malformed --time-budget fails before setup when there is a Python to ask (the estimate below needs setup)
if [ -n "$BUDGET" ] && [ -x .venv/bin/python ]; then .venv/bin/python -m nanochat.budget check "$BUDGET" || exit 2; fi

# ---------------------------------------------------------------- environment
echo "== setup ($(date '+%H:%M:%S'))"
if [ "$TINY" = 1 ]; then ./setup.sh --cpu; else ./setup.sh; fi
source scripts/common.sh
if [ -n "$BUDGET" ]; then
  # the budget is pretraining's only: say what comes on top (nanochat.budget.later_stages_line has the arithmetic)
  LATER_ARGS=(); [ -n "$DEPTH_GIVEN" ] && LATER_ARGS+=(--depth "$DEPTH_GIVEN")
  [ "$SKIP_RL" = 1 ] && LATER_ARGS+=(--skip-rl); [ "$TINY" = 1 ] && LATER_ARGS+=(--tiny)
  python -m nanochat.budget later-stages "$BUDGET" "${LATER_ARGS[@]}" || exit 2
fi
MARKS="$NANOCHAT_BASE_DIR/speedrun"
mkdir -p "$MARKS"
if [ -n "$DATA" ]; then
  # Offline: post-training and evaluation tasks come from generated sample files, unless
  # NANOCHAT_TASK_DATA already names your own folder.
  while IFS= read -r line; do
    var=${line#export }; var=${var%%=*}
    [ -n "${!var:-}" ] || eval "$line"
  done < <(python -m tasks.sample_data "$NANOCHAT_BASE_DIR/sample_tasks" --size 400)
fi

has_checkpoint() { [ -n "$(ls -d "$NANOCHAT_BASE_DIR/$1"/*/step_* 2>/dev/null | head -n1)" ]; }
# checkpoint_dir_of STEP: the checkpoint folder of the model stage a step trains (nanochat.stages
# names them); nothing for prepare and the evaluations
checkpoint_dir_of() {
  case "$1" in
    pretrain) python -m nanochat.stages folder base ;;
    mid|sft|rl) python -m nanochat.stages folder "$1" ;;
  esac
}

if [ -n "$FORCE" ]; then
  rm -f "$MARKS/$FORCE.done"
  folder=$(checkpoint_dir_of "$FORCE")
  if [ -n "$folder" ] && [ -d "$NANOCHAT_BASE_DIR/$folder" ]; then
    mv "$NANOCHAT_BASE_DIR/$folder" "$NANOCHAT_BASE_DIR/$folder.old-$(date +%Y%m%d-%H%M%S)"
    echo "moved the old $FORCE checkpoints aside"
  fi
fi

# a finished prepare stage is skipped: another --dataset would silently pretrain on the one prepared before
if [ -n "$DATASET" ] && [ -f "$MARKS/prepare.done" ]; then
  prepared=$(python -m nanochat.dataset --which)
  if [ "$prepared" != "$DATASET" ]; then
    echo "speedrun.sh: prepare finished with $prepared, not $DATASET; add --force prepare to prepare $DATASET" \
      "(it trains a new tokenizer: --force pretrain too)" >&2; exit 2
  fi
fi

# run_stage NAME COMMAND...: skip when done, otherwise run and mark done on success
run_stage() {
  local name="$1"; shift
  if [ -f "$MARKS/$name.done" ]; then echo "== $name: already done, skipping (--force $name redoes it)"; return; fi
  echo; echo "== $name ($(date '+%H:%M:%S'))"
  local started; started=$(date +%s)
  "$@"
  echo $(( $(date +%s) - started )) > "$MARKS/$name.seconds"
  date '+%F %T' > "$MARKS/$name.done"
}

prepare() {
  local args=(--vocab-size "$VOCAB" --max-chars "$TOK_CHARS" --no-wandb)
  if [ -n "$DATA" ]; then args+=(--from "$DATA" --offline); elif [ "$TINY" = 1 ]; then args+=(--shards 2 --total-shards 2); fi
  if [ -n "$DATASET" ]; then args+=(--dataset "$DATASET"); fi
  ./prepare.sh "${args[@]}"
}
base_eval() {
  if [ ! -d "${NANOCHAT_EVAL_BUNDLE:-$NANOCHAT_BASE_DIR/eval_bundle}" ]; then
    echo "no CORE evaluation bundle (offline?): skipping; later: python -m nanochat.eval_bundle && python -m scripts.base_eval"
    return
  fi
  python -m scripts.base_eval ${CORE_PER_TASK:+--max-per-task "$CORE_PER_TASK"}
}
chat_eval() {
  local stage
  for stage in mid sft rl; do
    has_checkpoint "$(checkpoint_dir_of "$stage")" && python -m scripts.chat_eval -i "$stage" "${EVAL_ARGS[@]}"
  done
  return 0
}

START=$(date +%s)
if [ -z "$(ls "$MARKS"/*.done 2>/dev/null)" ]; then
  python -m nanochat.report reset  # a fresh run starts a fresh report card; old sections are archived
fi
run_stage prepare prepare
# --no-core: CORE is the base-eval stage below, once, with the --tiny limit
run_stage pretrain ./pretrain.sh --no-core "${PROCESS_ARGS[@]}" "${DEPTH_ARGS[@]}" "${BUDGET_ARGS[@]}" ${BATCH:+--batch-size "$BATCH"} "${RUN_ARGS[@]}" "${PRETRAIN_EVAL_TOKENS[@]}" "${PRE_ARGS[@]}"
run_stage base-eval base_eval
run_stage mid ./midtrain.sh "${PROCESS_ARGS[@]}" "${RUN_ARGS[@]}" -- "${MID_ARGS[@]}"
run_stage sft ./sft.sh "${PROCESS_ARGS[@]}" "${RUN_ARGS[@]}" -- "${SFT_ARGS[@]}"
if [ "$SKIP_RL" = 0 ]; then
  run_stage rl ./rl.sh "${PROCESS_ARGS[@]}" "${RUN_ARGS[@]}" -- "${RL_ARGS[@]}"
fi
run_stage chat-eval chat_eval
echo; echo "== report ($(date '+%H:%M:%S'))"
echo "wall time by stage:"
python -m nanochat.report stage-times "$MARKS" $STAGES
python -m nanochat.report generate  # always: cheap, and it must reflect every stage, forced ones too

echo
# the table above adds up every stage, those of earlier calls included; this is this call's own time
echo "speedrun finished (this call: $(( ($(date +%s) - START) / 60 )) min; every stage: the table above)"
echo "report card: $NANOCHAT_BASE_DIR/report/report.md (a copy is in $(pwd)/report.md)"
echo "chat with it: ./chat_cli.sh   or in a browser: ./chat.sh   or as an API: ./chat_service.sh"
