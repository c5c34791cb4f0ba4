#!/usr/bin/env bash
# Create .venv (if missing) and install vlmprune with its test extra into it. Safe to run again.
#
# torch is installed first and pinned: a package that depends on torch would otherwise pull a multi-GB CUDA
# build on a CPU-only machine. torchvision is never installed: its registry build for torch 2.13 is a CUDA
# build that fails to import beside the CPU torch and then breaks transformers' LLaVA import.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"vlmprune needs Python >= 3.10; .venv has {sys.version.split()[0]} (set PYTHON=python3.11)")
PY

.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install --quiet -e ".[test]"

# lmms-eval (optional, for its task suite) declares torchvision, wandb, openai, ... as dependencies; install it
# without them, plus the ones its evaluator actually imports.
if [ "${VLMPRUNE_SKIP_LMMS_EVAL:-0}" != "1" ]; then
    .venv/bin/python -m pip install --quiet --no-deps "lmms-eval==0.7.3"
    .venv/bin/python -m pip install --quiet loguru jsonlines pytablewriter evaluate tenacity sqlitedict pyyaml \
        sacrebleu zstandard numexpr scikit-learn datasets
fi

if .venv/bin/python -m pip show --quiet torchvision >/dev/null 2>&1; then
    echo "warning: torchvision is installed in .venv; if transformers fails to import LLaVA," \
        "run: .venv/bin/python -m pip uninstall -y torchvision" >&2
fi
.venv/bin/python -c "import torch, transformers, vlmprune; print(f'vlmprune {vlmprune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
