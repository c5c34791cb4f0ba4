#!/usr/bin/env bash
# Regenerate requirements/lock.txt: install the newest allowed releases into a fresh .venv-lock, run the test
# suite there, and only if it passes write the exact versions installed (torch excepted: setup.sh pins it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rm -rf .venv-lock
bash scripts/setup.sh --newest --venv .venv-lock
.venv-lock/bin/python -m pytest -q -p no:cacheprovider
{
    echo "# The versions scripts/setup.sh installs by default, with which the test suite last passed."
    echo "# Regenerate with: bash scripts/lock.sh  ($(.venv-lock/bin/python --version), $(date -u +%Y-%m-%d))"
    .venv-lock/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
        | grep -v -i -E '^(torch|nvidia-[a-z0-9-]+|triton)=='
} > requirements/lock.txt
rm -rf .venv-lock
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)"
