#!/usr/bin/env bash
# Create a virtual environment (default .venv) with vlmprune, its test extra and lmms-eval. Safe to run again.
#
#   bash scripts/setup.sh                        # the versions in requirements/lock.txt (what CI last passed with)
#   bash scripts/setup.sh --newest               # the newest releases the declared ranges allow
#   bash scripts/setup.sh --transformers 5.4.0   # one transformers release, the newest of everything else
#   options: --venv DIR (default .venv), --no-lmms-eval (also VLMPRUNE_SKIP_LMMS_EVAL=1)
#
# torch is installed first and pinned (TORCH_VERSION, default 2.13.0): a package that depends on torch would
# otherwise pull a multi-GB CUDA build on a CPU-only machine. torchvision is never installed: its registry build
# for torch 2.13 is a CUDA build that fails to import beside the CPU torch and then breaks transformers' LLaVA.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LMMS_EVAL_VERSION="0.7.3"
VENV=".venv"
MODE="locked"
TRANSFORMERS=""
LMMS_EVAL=1
[ "${VLMPRUNE_SKIP_LMMS_EVAL:-0}" = "1" ] && LMMS_EVAL=0

while [ $# -gt 0 ]; do
    case "$1" in
        --newest) MODE="newest" ;;
        --transformers) TRANSFORMERS="${2:?--transformers needs a version}"; MODE="newest"; shift ;;
        --venv) VENV="${2:?--venv needs a directory}"; shift ;;
        --no-lmms-eval) LMMS_EVAL=0 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"vlmprune needs Python >= 3.10; the venv has {sys.version.split()[0]} (set PYTHON=python3.11)")
PY

# pip's options for each mode: the lock as constraints, or upgrades to the newest allowed releases.
if [ "$MODE" = "locked" ]; then
    PIN=(-c requirements/lock.txt)
else
    PIN=(--upgrade)
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" "${PIN[@]}" "torch==${TORCH_VERSION}"
"${PIP[@]}" "${PIN[@]}" -e ".[test]" ${TRANSFORMERS:+"transformers==${TRANSFORMERS}"}

if [ "$LMMS_EVAL" = "1" ]; then
    "${PIP[@]}" "${PIN[@]}" -r requirements/lmms-eval.txt ${TRANSFORMERS:+"transformers==${TRANSFORMERS}"}
    # --no-deps leaves lmms-eval's heavy dependencies out on purpose; pip would list each as an ERROR.
    "${PIP[@]}" --no-deps --no-warn-conflicts "lmms-eval==${LMMS_EVAL_VERSION}"
    echo "lmms-eval ${LMMS_EVAL_VERSION}: installed without torchvision, wandb, openai and its other optional" \
        "dependencies (see requirements/lmms-eval.txt)"
fi

if "$PY" -m pip show --quiet torchvision >/dev/null 2>&1; then
    echo "warning: torchvision is installed in $VENV; if transformers fails to import LLaVA," \
        "run: $PY -m pip uninstall -y torchvision" >&2
fi
"$PY" -c "import torch, transformers, vlmprune; print(f'vlmprune {vlmprune.__version__} in $VENV ($MODE): torch {torch.__version__}, transformers {transformers.__version__}')"
