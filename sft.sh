#!/usr/bin/env bash
# Supervised finetuning on conversations, then evaluate it (scripts.chat_eval). ./sft.sh --help
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
post_stage scripts.chat_sft "$@"
