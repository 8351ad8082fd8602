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
port=$((30000 + RANDOM % 20000))
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$tmp" \
  --daemonize yes --pidfile "$tmp/redis.pid" >/dev/null
for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
trap 'kill $(cat "$tmp/redis.pid" 2>/dev/null) 2>/dev/null; rm -rf "$tmp"' EXIT
export AM2Z_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
runner=$(mktemp --suffix=.lua)
echo "require 'busted.runner'({ standalone = false })" > "$runner"
AM2Z_UNDER_VALGRIND=1 AM2Z_TEST_TIMEOUT_MULT=20 AM2Z_BIN="$PWD/build/bin/am2z-lua" \
  "${VG[@]}" luajit "$runner" spec || status=1
rm -f "$runner"
if [ $status -eq 0 ]; then echo "memory checks: clean"; else echo "memory checks: FAILED"; fi
exit $status
