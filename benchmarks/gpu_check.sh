#!/usr/bin/env bash
# The GPU check in one command (issue 12, section 6): kernel parity compiled on the GPU, the
# kernels' convergence run, benchmarks/kernels.py, and the decoder at 125M / 1B in bf16 with
# kernels backend triton vs torch; one table at the end (benchmarks/gpu_check.py has the details).
#
#   bash benchmarks/gpu_check.sh            # <= 8 min on one H100/H200; exit 1 on any parity failure
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs torch, triton and transformers' usual dependencies only (no ray, deepspeed or datasets:
# the driver blocks them). On a machine without CUDA it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export TOKENIZERS_PARALLELISM=false
# 480 s hard limit (the driver budgets 450 s and reports what it skipped); exit status is the driver's
exec timeout --signal=INT --kill-after=15 480 "$PYTHON" benchmarks/gpu_check.py "$@"
