#!/usr/bin/env bash
# Replication benchmark: two namespaces joined by a veth on 198.18.0.0/24 (this run's own, removed
# on exit or Ctrl-C), one `sync-bench` process in each: the real tracker, feed, gRPC stream, codec,
# core and table import (tests/src/bin/sync-bench.rs). Measures, for issue 10's targets:
#   stream  events/s of a burst of new connections (target >= 300 000/s)
#   lag     p50/p99 replication lag at 10 000 new connections/s (target p99 <= 5 ms)
#   bulk    time for a peer that comes up to receive 1 M entries, and its memory (target <= 2 s)
# Every process is bounded in time. Usage (root): bash tests/bench-sync.sh [STREAM_N] [BULK_N]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
BULK=${2:-1000000}
P="ks$$"
A=$P-a B=$P-b
BIN=${KEEPSTATE_BIN_DIR:-$PWD/target/release}
PY=/usr/bin/python3
PIDS=()
OUT=/tmp/$P
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.2
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  for ns in $A $B; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$OUT"
}
trap cleanup EXIT INT TERM
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$BIN/sync-bench" ] || { echo "$BIN/sync-bench missing: cargo build --release -p keepstate-tests" >&2; exit 1; }
mkdir -p "$OUT"
# Production's transport: mTLS with a CA and node certificates made for this run.
[ -x "$BIN/fwctl" ] || { echo "$BIN/fwctl missing: cargo build --release -p fwctl" >&2; exit 1; }
"$BIN/fwctl" certs --dir "$OUT/tls" init >/dev/null
for id in 1 2; do "$BIN/fwctl" certs --dir "$OUT/tls" issue-node $id >/dev/null; done
export KEEPSTATE_TLS_DIR="$OUT/tls"
for ns in $A $B; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n $A link add ${P}a type veth peer name ${P}b netns $B
ip -n $A link set ${P}a up; ip -n $B link set ${P}b up
ip -n $A addr add 198.18.0.1/24 dev ${P}a
ip -n $B addr add 198.18.0.2/24 dev ${P}b

# run NAME: receiver in B (node 2), sender in A (node 1); sender args follow.
run() {
  local name=$1 count=$2; shift 2
  ip netns exec $B timeout 130 "$BIN/sync-bench" recv 2 198.18.0.2:7401 1 198.18.0.1:7401 "$count" > "$OUT/$name.recv" 2>"$OUT/$name.recv.err" &
  local r=$!; PIDS+=($r)
  ip netns exec $A timeout 130 "$BIN/sync-bench" send 1 198.18.0.1:7401 2 198.18.0.2:7401 "$@" > "$OUT/$name.send" 2>"$OUT/$name.send.err" &
  local s=$!; PIDS+=($s)
  wait $r || true
  kill $s 2>/dev/null || true; wait $s 2>/dev/null || true
}

run stream "$N" stream "$N"
run lag 20000 lag 20000 10000

# bulk: the sender fills its table first, then the receiver comes up.
ip netns exec $A timeout 190 "$BIN/sync-bench" send 1 198.18.0.1:7401 2 198.18.0.2:7401 bulk "$BULK" > "$OUT/bulk.send" 2>"$OUT/bulk.send.err" &
S=$!; PIDS+=($S)
for _ in $(seq 1 1200); do grep -q '^ready' "$OUT/bulk.send" 2>/dev/null && break; sleep 0.1; done
ip netns exec $B timeout 130 "$BIN/sync-bench" recv 2 198.18.0.2:7401 1 198.18.0.1:7401 "$BULK" > "$OUT/bulk.recv" 2>"$OUT/bulk.recv.err" || true
kill $S 2>/dev/null || true

$PY - "$OUT" "$N" "$BULK" <<'PYEOF'
import sys
out, n, bulk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def samples(name):
    rows, meta = [], {}
    for line in open(f"{out}/{name}.recv"):
        f = line.split()
        if f[0].isdigit():
            rows.append((int(f[0]), int(f[1])))
        elif f[0] == "start_ns":
            meta["start"] = int(f[1])
        elif f[0] == "learned":
            meta["learned"], meta["rss"], meta["grew"] = int(f[1]), f[3], f[5]
    return rows, meta
def t0(name):
    for line in open(f"{out}/{name}.send"):
        f = line.split()
        if f and f[0] == "t0_ns":
            return int(f[1]), (int(f[3]) if len(f) > 3 else None)
rows, meta = samples("stream")
start, _ = t0("stream")
if rows and rows[-1][0] >= n:
    secs = (rows[-1][1] - start) / 1e9
    print(f"stream: {n} new connections replicated in {secs:.3f} s = {n/secs:,.0f} events/s (target >= 300,000)")
else:
    print(f"stream: FAILED, receiver learned {rows[-1][0] if rows else 0} of {n}")
rows, meta = samples("lag")
start, rate = t0("lag")
lags = []
prev = 0
for k, ns in rows:
    for i in range(prev, k):
        lags.append((ns - (start + i * 1e9 / rate)) / 1e6)
    prev = k
lags.sort()
if lags:
    p = lambda q: lags[min(len(lags) - 1, int(q * (len(lags) - 1)))]
    print(f"lag at {rate}/s: {len(lags)} connections, p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {lags[-1]:.2f} ms (target p99 <= 5 ms)")
rows, meta = samples("bulk")
if rows and rows[-1][0] >= bulk:
    secs = (rows[-1][1] - meta["start"]) / 1e9
    print(f"bulk: a peer that comes up has {bulk:,} entries after {secs:.2f} s (process start to last entry; target <= 2 s); receiver RSS {meta['rss']} MiB")
else:
    print(f"bulk: FAILED, receiver learned {rows[-1][0] if rows else 0} of {bulk}")
PYEOF
