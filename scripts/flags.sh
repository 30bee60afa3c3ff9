# Sourced by the stage scripts (through scripts/common.sh), and by setup.sh and speedrun.sh, which run before
# .venv exists. canonical_flags ARGS...: sets FLAGS to ARGS in the one spelling the scripts' option loops match,
# so the original DGX Spark nanochat's spellings work too: --device_batch_size=32 becomes --device-batch-size 32,
# --run=NAME becomes --run NAME. Only option names change, never values; nothing after `--` changes (the Python
# scripts it goes to take both spellings themselves, see nanochat/flags.py).
canonical_flags() {
  FLAGS=()
  local name
  while [ $# -gt 0 ]; do
    case "$1" in
      --) FLAGS+=("$@"); return ;;
      --*=*) name=${1%%=*}; FLAGS+=("${name//_/-}" "${1#*=}") ;;
      --*) FLAGS+=("${1//_/-}") ;;
      *) FLAGS+=("$1") ;;
    esac
    shift
  done
}
