#!/usr/bin/env bash
# Chat with your model in a browser: starts the server and prints the address to open.
# All flags go to scripts.chat_service: ./chat.sh --help
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
exec python -m scripts.chat_service --banner web "$@"
