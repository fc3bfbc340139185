#!/usr/bin/env bash
# Creates .venv and installs llmtrain into it. `./setup.sh --test` adds the test extra.
# Without CUDA, torch==2.13.0 is installed first so pip takes the CPU wheel instead of
# pulling a multi-GB CUDA build to satisfy the other packages' torch requirement.
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.5,<2.14"
  else
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
.venv/bin/pip install -q -e ".${extra}"
