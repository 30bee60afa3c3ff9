#!/usr/bin/env bash
# Reinforcement learning on GSM8K, then evaluate it (scripts.chat_eval). ./rl.sh --help
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
post_stage scripts.chat_rl "$@"
