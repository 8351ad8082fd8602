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
# Our processes are traced (luajit, am2z-lua, the shells that start them);
# other programs the specs start (the C compiler, node, redis) are not.
VG=(valgrind --quiet --trace-children=yes
    "--trace-children-skip=*/cc,*/gcc*,*/x86_64-linux-gnu-gcc*,*/cc1,*/collect2,*/ld,*/as,*/cmake,*/ctest,*/node,*/npm,*/redis-server,*/redis-cli,*/pkg-config,*/sed,*/mktemp,*/ls,*/cp,*/rm,*/mkdir,*/cat,*/touch,*/sleep,*/strace,*/luarocks*,*/lua5.*,*/make,*/gmake"
    --leak-check=full --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect
    --error-exitcode=9 --smc-check=all-non-file)
"${VG[@]}" ./build/test_core || status=1
# a throwaway redis-server, so the Redis specs run under valgrind too
tmp=$(mktemp -d)
source scripts/lib/redis.sh
trap 'if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi; rm -rf "$tmp"' EXIT
start_redis "$tmp" || { echo "check-memory: redis-server did not start"; cat "$tmp/redis.log"; exit 1; }
export AM2Z_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
runner=$(mktemp --suffix=.lua)
echo "require 'busted.runner'({ standalone = false })" > "$runner"
AM2Z_UNDER_VALGRIND=1 AM2Z_TEST_TIMEOUT_MULT=20 AM2Z_BIN="$PWD/build/bin/am2z-lua" \
  "${VG[@]}" luajit "$runner" spec || status=1
rm -f "$runner"
if [ $status -eq 0 ]; then echo "memory checks: clean"; else echo "memory checks: FAILED"; fi
exit $status
