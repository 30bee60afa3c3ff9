#!/usr/bin/env bash
# Serve your model as an OpenAI-compatible API (and the web page) on port 8000.
# All flags go to scripts.chat_service: ./chat_service.sh --help
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
exec python -m scripts.chat_service --banner api "$@"
