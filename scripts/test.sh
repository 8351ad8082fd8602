#!/usr/bin/env bash
# The whole test suite: set-up and build, the C unit tests (ctest), then every
# busted spec under LuaJIT with a throwaway redis-server on a free loopback
# port. Ends with one line "N passed, N failed" over all suites and exits
# non-zero if anything failed.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh --asan          # same, built with ASan + UBSan
#   bash scripts/test.sh spec/foo_spec.lua ...   # only these specs (still builds)
set -uo pipefail
cd "$(dirname "$0")/.."

ASAN=0
SPECS=()
for a in "$@"; do
  case "$a" in
    --asan) ASAN=1 ;;
    *) SPECS+=("$a") ;;
  esac
done

if [ $ASAN -eq 1 ]; then
  export AM2Z_BUILD_DIR=build-asan
  export AM2Z_CMAKE_ARGS="-DAM2Z_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug"
  export AM2Z_TEST_TIMEOUT_MULT=${AM2Z_TEST_TIMEOUT_MULT:-3}
fi
BUILD_DIR="${AM2Z_BUILD_DIR:-build}"
bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }
export AM2Z_BUILD_DIR="$BUILD_DIR"

passed=0
failed=0
tmp=$(mktemp -d)
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---- throwaway redis-server on a free loopback port
source scripts/lib/redis.sh
if command -v redis-server >/dev/null; then
  if start_redis "$tmp"; then
    export AM2Z_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
  else
    echo "test: redis-server did not start:"; cat "$tmp/redis.log"
    failed=$((failed + 1))
  fi
fi

# ---- C unit tests
if [ ${#SPECS[@]} -eq 0 ]; then
  (cd "$BUILD_DIR" && ctest --output-on-failure) | tee "$tmp/ctest.log"
  line=$(grep -E "tests passed, [0-9]+ tests failed out of [0-9]+" "$tmp/ctest.log" | tail -1)
  if [ -n "$line" ]; then
    total=$(echo "$line" | sed -E 's/.*out of ([0-9]+).*/\1/')
    nf=$(echo "$line" | sed -E 's/.* ([0-9]+) tests failed.*/\1/')
    passed=$((passed + total - nf))
    failed=$((failed + nf))
  else
    failed=$((failed + 1))
  fi
fi

# ---- Node peers for the BullMQ interop specs (bullmq pinned in
# spec/interop/package.json); without node the interop specs say pending.
if command -v npm >/dev/null && [ ! -d spec/interop/node_modules/bullmq ]; then
  (cd spec/interop && npm ci --no-audit --no-fund >/dev/null 2>&1) \
    || echo "test: npm ci in spec/interop failed; interop specs will be pending"
fi

# ---- busted specs (LuaJIT), TAP output so the counts can be added up
export AM2Z_BIN="$PWD/$BUILD_DIR/bin/am2z-lua"
export LUA_CPATH="$PWD/$BUILD_DIR/lib/?.so;;"
PRELOAD=""
if [ $ASAN -eq 1 ]; then
  PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
fi
if [ ${#SPECS[@]} -eq 0 ]; then SPECS=(spec); fi
LD_PRELOAD="$PRELOAD" busted --lua=luajit --cpath="$BUILD_DIR/lib/?.so" -o TAP "${SPECS[@]}" \
  2>&1 | tee "$tmp/busted.log"
ok=$(grep -cE "^ok [0-9]+" "$tmp/busted.log")
nok=$(grep -cE "^not ok [0-9]+" "$tmp/busted.log")
plan=$(grep -E "^1\.\.[0-9]+" "$tmp/busted.log" | tail -1 | sed 's/1\.\.//')
passed=$((passed + ok))
failed=$((failed + nok))
if [ -z "$plan" ]; then
  echo "busted did not finish (no TAP plan line)"
  failed=$((failed + 1))
fi

# ---- the shared runtime specs once more, against QueueRuntime on the
# throwaway redis-server (spec/runtime_factory.lua picks the runtime). Part of
# every full run; with named specs only when AM2Z_TEST_QUEUE_RERUN=1.
QUEUE_SPECS=(spec/runtime_spec.lua spec/compose_spec.lua spec/semantics_spec.lua)
if [ -n "${AM2Z_TEST_REDIS_URL:-}" ] \
   && { [ "${SPECS[*]}" = "spec" ] || [ -n "${AM2Z_TEST_QUEUE_RERUN:-}" ]; }; then
  AM2Z_TEST_RUNTIME=queue LD_PRELOAD="$PRELOAD" busted --lua=luajit --cpath="$BUILD_DIR/lib/?.so" \
    -o TAP "${QUEUE_SPECS[@]}" 2>&1 | tee "$tmp/busted-queue.log"
  ok=$(grep -cE "^ok [0-9]+" "$tmp/busted-queue.log")
  nok=$(grep -cE "^not ok [0-9]+" "$tmp/busted-queue.log")
  passed=$((passed + ok))
  failed=$((failed + nok))
  if ! grep -qE "^1\.\.[0-9]+" "$tmp/busted-queue.log"; then
    echo "busted (QueueRuntime run) did not finish (no TAP plan line)"
    failed=$((failed + 1))
  fi
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
