#!/usr/bin/env bash
# Creates benchmarks/vs_dspy/.venv (DSPy 3.x + TRL, no system site-packages) for run.py.
#   bash benchmarks/vs_dspy/setup.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
"$python" -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
# torch first, pinned, so that nothing below replaces it with another build.
"$here/.venv/bin/pip" install -q "torch==2.13.0"   # the local CPU build, as scripts/install.sh
"$here/.venv/bin/pip" install -q -r "$here/requirements.txt"
"$here/.venv/bin/python" -c "import dspy, trl, torch; print('dspy', dspy.__version__, 'trl', trl.__version__, 'torch', torch.__version__)"
