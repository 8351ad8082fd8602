#!/usr/bin/env bash
# bench/queue.sh -- am2z.queue against BullMQ's Node Worker, on ONE throwaway
# redis-server (a free loopback port, no persistence, removed afterwards).
#
#   bash bench/queue.sh            # N = 20,000 jobs, 2,000 round trips
#   bash bench/queue.sh --quick    # N = 2,000 jobs, 200 round trips
#
# Runs bench/queue.lua with ./build/bin/am2z-lua (build it first: bash
# scripts/setup.sh), FLUSHALL, then bench/queue_bullmq.js with node (the bullmq
# and ioredis versions pinned in bench/package.json; `npm ci` here when
# bench/node_modules is missing), and prints a table of both with ratios.
# Each part runs under a timeout. Not part of the test suite.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=""
for a in "$@"; do
  case "$a" in
    --quick) QUICK="--quick" ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: bash bench/queue.sh [--quick]" >&2; exit 2 ;;
  esac
done

BIN="${AM2Z_BIN:-./build/bin/am2z-lua}"
if [ -n "$QUICK" ]; then PART_TIMEOUT=300; else PART_TIMEOUT=1200; fi

NAME=bench/queue.sh
source bench/env.sh

# ---- the two runs
status=0
timeout -k 10 "$PART_TIMEOUT" "$BIN" bench/queue.lua --url "$URL" $QUICK 2>&1 | tee "$tmp/am2z.out" | grep -v '^RESULT '
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "bench/queue.sh: am2z-lua part exited $rc (124/137: timed out)"; status=1; fi
echo
redis-cli -h 127.0.0.1 -p "$port" FLUSHALL >/dev/null
timeout -k 10 "$PART_TIMEOUT" node bench/queue_bullmq.js --url "$URL" $QUICK 2>&1 | tee "$tmp/bullmq.out" | grep -v '^RESULT '
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "bench/queue.sh: bullmq part exited $rc (124/137: timed out)"; status=1; fi
echo

# ---- comparison table
awk '
  $1 == "RESULT" { v[(FILENAME == ARGV[1]) ? 1 : 2, $2] = $3 }
  function row(label, key, fmtv, better,   a, b, r) {
    a = ((1, key) in v) ? v[1, key] : ""
    b = ((2, key) in v) ? v[2, key] : ""
    r = (a != "" && b != "" && b + 0 != 0) ? sprintf("%.2fx", a / b) : "-"
    printf "%-40s %12s %12s %12s  %s\n", label, (a == "" ? "-" : sprintf(fmtv, a)), \
      (b == "" ? "-" : sprintf(fmtv, b)), r, better
  }
  END {
    printf "%-40s %12s %12s %12s\n", "", "am2z-lua", "bullmq", "am2z/bullmq"
    row("consume, concurrency 1 (jobs/s)", "jobs_s_c1", "%.0f", "higher is better")
    row("consume, concurrency 10 (jobs/s)", "jobs_s_c10", "%.0f", "higher is better")
    row("consume, concurrency 100 (jobs/s)", "jobs_s_c100", "%.0f", "higher is better")
    row("addBulk, chunks of 1,000 (jobs/s)", "add_s_c1", "%.0f", "higher is better (c1 phase)")
    row("round trip p50 (ms)", "rt_p50_ms", "%.3f", "lower is better")
    row("round trip p99 (ms)", "rt_p99_ms", "%.3f", "lower is better")
    row("round trip mean (ms)", "rt_mean_ms", "%.3f", "lower is better")
    row("round trip max (ms)", "rt_max_ms", "%.3f", "lower is better")
    row("round trips of >= 1 s (count)", "rt_slow", "%d", "")
    row("worker peak RSS, c1 (MiB)", "rss_mib_c1", "%.1f", "lower is better")
    row("worker peak RSS, c10 (MiB)", "rss_mib_c10", "%.1f", "lower is better")
    row("worker peak RSS, c100 (MiB)", "rss_mib_c100", "%.1f", "lower is better")
  }' "$tmp/am2z.out" "$tmp/bullmq.out"
exit $status
