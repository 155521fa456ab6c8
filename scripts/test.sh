#!/usr/bin/env bash
# Run the whole test suite the way CI does.
#   - .venv       the workstation wing (torch + ultralytics): tests/export
#   - .venv-edge  the device wing only (no torch, no ultralytics): tests/edge, which proves the
#                 device install is light
#   - mypy over edge/ and export/, in .venv (edge/engines/tensorrt.py against TensorRT's stubs)
# Creates both environments on first use (torch from the local wheel cache; see README).
# Extra arguments go to both pytest runs (e.g. -x, -k name, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv-edge/bin/python ] || ! .venv-edge/bin/python -c 'import edge, paho.mqtt, onnxruntime, pytest' 2>/dev/null; then
  echo "== creating .venv-edge (edge extra only)"
  "$PY" -m venv .venv-edge
  .venv-edge/bin/python -m pip install -q --upgrade pip
  .venv-edge/bin/python -m pip install -q -e '.[edge,test]'
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import edge, ultralytics, torchvision, pytest' 2>/dev/null; then
  echo "== creating .venv (workstation: torch, ultralytics)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, from the pinned pair, or pip swaps torch for another build on its own.
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e '.[train,edge,test,dev]'
fi

if ! .venv/bin/python -m mypy --version >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -e '.[dev]'  # an older .venv: the type checker came later
fi

# TensorRT's type stubs, pinned in pyproject.toml's trt-stubs extra, WITHOUT their dependencies
# (they declare TensorRT itself): the device tests compare the TensorRT fake with them.
trt_stubs="$(sed -n 's/^ *"\(tensorrt-stubs==[^"]*\)",*$/\1/p' pyproject.toml)"
for venv in .venv .venv-edge; do
  "$venv/bin/python" -m pip install -q --no-deps "$trt_stubs"
done

status=0
echo "== lint"
.venv/bin/ruff check edge export tests || status=1
echo "== type check (mypy over edge/ and export/; settings in pyproject.toml)"
.venv/bin/python tests/edge/trt_stubs.py build/typing >/dev/null && .venv/bin/python -m mypy || status=1
echo "== device wing, in an environment without torch"
.venv-edge/bin/python -m pytest tests/edge -q -p no:cacheprovider "$@" || status=1
echo "== workstation wing"
.venv/bin/python -m pytest tests/export -q -p no:cacheprovider "$@" || status=1
exit $status
