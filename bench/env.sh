# Sourced by bench/queue.sh and bench/runtime.sh: checks the tools, installs
# the Node peer's pinned dependencies when missing, and starts a throwaway
# redis-server on a free loopback port (stopped and removed on exit).
# In: NAME (for messages), BIN. Out: tmp, port, URL, redis_pid.

for tool in redis-server redis-cli node npm timeout; do
  command -v "$tool" >/dev/null || { echo "$NAME: $tool not found" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "$NAME: $BIN missing (build first: bash scripts/setup.sh)" >&2; exit 1; }

# ---- Node peer's dependencies
if [ ! -d bench/node_modules/bullmq ] || [ ! -d bench/node_modules/ioredis ]; then
  echo "installing bench/node_modules (bullmq, ioredis as pinned in bench/package.json)..."
  if [ -f bench/package-lock.json ]; then
    (cd bench && timeout 300 npm ci --no-audit --no-fund >/dev/null) || { echo "npm ci failed" >&2; exit 1; }
  else
    (cd bench && timeout 300 npm install --no-audit --no-fund >/dev/null) || { echo "npm install failed" >&2; exit 1; }
  fi
fi

# ---- throwaway redis-server
tmp=$(mktemp -d)
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/redis.sh"
start_redis "$tmp" \
  || { echo "$NAME: redis-server did not start:" >&2; cat "$tmp/redis.log" >&2; exit 1; }
port=$redis_port
URL="redis://127.0.0.1:$port/0"
echo "redis-server $(redis-server --version | sed -E 's/.* v=([^ ]+).*/\1/') on $URL; $(nproc) cores;" \
  "$("$BIN" --version 2>/dev/null | head -1); node $(node --version);" \
  "bullmq $(node -p "require('./bench/node_modules/bullmq/package.json').version")"
echo
