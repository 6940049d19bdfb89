#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the test suite. Extra arguments go to
# pytest; the default run excludes tests marked slow (run those with: bash scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
