#!/usr/bin/env bash
# Create .venv and install moetron with its dev extra. Idempotent; nothing to do by hand.
# torch goes in first, pinned: a bare `torch` requirement on a machine without it pulls a
# multi-GB CUDA build, while torch==2.13.0 installs the CPU build (from local disk where present).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${MOETRON_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==${TORCH_VERSION}"
    "${PIP[@]}" "torch==${TORCH_VERSION}"
fi
# Pin whatever torch is now installed so resolving the extras never replaces it.
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv/torch-constraint.txt
echo "[setup] installing moetron[dev] (torch $(cut -d= -f3 .venv/torch-constraint.txt))"
"${PIP[@]}" -c .venv/torch-constraint.txt -e ".[dev]"
