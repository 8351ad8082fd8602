#!/usr/bin/env bash
# One command for a new user: install what is missing, build, and run the
# order-processing example on the embedded default (LocalRuntime, no Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./build/bin/am2z-lua examples/quickstart.lua "$@"
