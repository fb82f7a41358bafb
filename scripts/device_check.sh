#!/usr/bin/env bash
# One command for a lent GPU (H100 / H200): every device benchmark of jopd, each part under its own time limit,
# into OUT_DIR/device_check.json and OUT_DIR/device_check.md. See scripts/device_check.py for the parts.
#
#   bash scripts/device_check.sh OUT_DIR            # on the GPU: ~6 minutes, at most 8
#   bash scripts/device_check.sh OUT_DIR --small    # the same parts at tiny shapes on CPU (~2-3 minutes)
#
# The Python interpreter is $PYTHON if set, else the repository's .venv, else `python` / `python3` on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/device_check.sh OUT_DIR [--small]" >&2
    exit 2
fi
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then
        py="$here/../.venv/bin/python"
    else
        py="$(command -v python || command -v python3)"
    fi
fi
exec "$py" "$here/device_check.py" "$@"
