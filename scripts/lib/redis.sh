# Sourced by scripts/test.sh and bench/env.sh: start_redis DIR starts a
# throwaway redis-server on a free loopback port and sets redis_pid and
# redis_port (returns 1 when none came up; the last log is DIR/redis.log).
#
# Ports are taken below the kernel's ephemeral range: one inside it may be
# the local end of a client connection (or in TIME-WAIT from one), and then
# the server cannot bind it. A server that does not come up is retried on
# another port.
start_redis() {
  local dir=$1 low base span p try pid
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  if [ "$low" -gt 13025 ]; then base=$((low - 12000)); span=12000
  else base=20000; span=10000; fi     # (no room below the range: retries cover it)
  redis_pid=""
  redis_port=""
  for try in 1 2 3 4 5 6 7 8; do
    p=$((base + (RANDOM * 32768 + RANDOM) % span))
    if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then continue; fi
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
      --daemonize no >"$dir/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 1 100); do
      # ours, not another server that took the port meanwhile
      pid=$(redis-cli -h 127.0.0.1 -p "$p" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')
      if [ "$pid" = "$redis_pid" ]; then
        redis_port=$p
        return 0
      fi
      kill -0 "$redis_pid" 2>/dev/null || break
      sleep 0.05
    done
    kill "$redis_pid" 2>/dev/null
    wait "$redis_pid" 2>/dev/null
    redis_pid=""
  done
  return 1
}
