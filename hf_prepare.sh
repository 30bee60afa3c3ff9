#!/usr/bin/env bash
# Prepare HuggingFace Hub folders of your trained models (or, with --download, install a shared one);
# all flags go to scripts.hf_prepare (--help lists them). Then: python upload_to_hf.py --username USER --dry-run
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
exec python -m scripts.hf_prepare "$@"
