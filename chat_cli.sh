#!/usr/bin/env bash
# Chat with your model in the terminal; all flags go to scripts.chat_cli (--help lists them).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
exec python -m scripts.chat_cli "$@"
