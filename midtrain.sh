#!/usr/bin/env bash
# Midtrain the base model on conversations (chat format, tool use, multiple choice), then evaluate it (scripts.chat_eval). ./midtrain.sh --help
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
post_stage scripts.mid_train "$@"
