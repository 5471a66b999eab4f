#!/usr/bin/env bash
# Creates .venv-kvpress: a separate virtual environment with NVIDIA's kvpress 0.5.5, used by
# benchmarks/kvpress_smollm2.py to measure kvpress's presses on the same windows as slimformer's A2SF
# (benchmarks/a2sf_smollm2.py). Separate from .venv because kvpress 0.5.5 requires transformers >= 4.56,
# < 5.3, while the project runs on transformers 5.24.
#
# Idempotent: a stamp file records the pinned set; a second run with the same pins does nothing.
# Usage: .ci/setup_kvpress.sh [VENV_DIR]   (default: .venv-kvpress in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-kvpress}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
KVPRESS_PIN="kvpress==0.5.5"
# The newest transformers kvpress 0.5.5 accepts (>= 4.56, < 5.3).
TRANSFORMERS_PIN="transformers==5.2.0"
PINS="$TORCH_PIN $KVPRESS_PIN $TRANSFORMERS_PIN"
STAMP="$VENV/.slimformer-kvpress-installed"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" ]]; then
    echo "setup_kvpress: $VENV is up to date ($PINS)"
    exit 0
fi

start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: the CPU wheel is found locally; letting kvpress resolve torch on its own would
# pull gigabytes of CUDA packages.
"$VENV/bin/pip" install -q "$TORCH_PIN"
"$VENV/bin/pip" install -q "$KVPRESS_PIN" "$TRANSFORMERS_PIN" "$TORCH_PIN"
# Fail here, not in the benchmark, if the environment cannot import kvpress.
"$VENV/bin/python" -c "import kvpress, transformers, torch; from importlib.metadata import version; \
print('setup_kvpress: kvpress', version('kvpress'), 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "$PINS" > "$STAMP"
echo "setup_kvpress: done in $(( $(date +%s) - start )) s"
