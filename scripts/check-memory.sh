#!/usr/bin/env bash
# Memory checks, beyond the normal suite (slower, so not part of CI's run):
#   1. the whole suite built with AddressSanitizer + UBSan;
#   2. the C unit tests and every busted spec under valgrind (memcheck),
#      failing on any error or definite/indirect leak in our code.
# Usage: bash scripts/check-memory.sh
set -uo pipefail
cd "$(dirname "$0")/.."
status=0

echo "== ASan + UBSan =="
bash scripts/test.sh --asan || status=1

echo "== valgrind =="
if ! command -v valgrind >/dev/null; then
  apt-get install -y -qq valgrind >/dev/null
fi
bash scripts/setup.sh >/dev/null
VG=(valgrind --quiet --trace-children=yes --leak-check=full
    --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect
    --error-exitcode=9 --smc-check=all-non-file)
"${VG[@]}" ./build/test_core || status=1
runner=$(mktemp --suffix=.lua)
echo "require 'busted.runner'({ standalone = false })" > "$runner"
AM2Z_TEST_TIMEOUT_MULT=20 AM2Z_BIN="$PWD/build/bin/am2z-lua" \
  "${VG[@]}" luajit "$runner" spec || status=1
rm -f "$runner"
if [ $status -eq 0 ]; then echo "memory checks: clean"; else echo "memory checks: FAILED"; fi
exit $status
