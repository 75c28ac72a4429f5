#!/usr/bin/env bash
# Datapath benchmark: builds client — gw — server in network namespaces (this run's own, removed
# on exit or Ctrl-C) and measures, in ONE run so the ratios are fair on a noisy machine:
#   kernel forwarding (no rules) · kernel iptables stateful rules · accept-all NFQUEUE loop
#   (one verdict per packet) without and with GSO · the best-case NFQUEUE loop (accept-all with
#   header-only copy, GSO and batched verdicts: this datapath's physical limit here) with 1 and 2
#   queues · fwnode (tracking + 50-rule policy), with 1 and 2
#   queues, and with 1 queue replicating its table to a standby (the real sync shell and tracker of
#   `sync-bench recv` in a fourth namespace on 198.18.0.0/24)
# for: iperf3 TCP Gbit/s, iperf3 UDP 64-byte packets/s received, new TCP connections/s.
# Every load is bounded in time. Usage (root): bash tests/bench-datapath.sh [SECONDS]
# PROFILE=DIR: instead, profile fwnode (1 queue) under the UDP 64 B load and the connection load with a
# system-wide `perf record`, and write DIR/{udp,conn}.{folded,svg} (flame graphs, with inferno installed:
# `cargo install inferno`) and the per-stage breakdown (tests/perf-stages.py) to stdout.
# With KEEPSTATE_BENCH_OUT=FILE the results are also written to FILE as JSON (the input of
# `python3 tests/plot.py ratios FILE OUT.svg`); the table is printed either way.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
P="kb$$"
C=$P-c G=$P-g S=$P-s B=$P-b
SERVER=203.0.113.10
PY=/usr/bin/python3
BIN=${KEEPSTATE_BIN_DIR:-$PWD/target/release}
PIDS=()

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  for ns in $C $G $S $B; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "/tmp/$P"
}
trap cleanup EXIT INT TERM

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
# A missing tool would otherwise turn into a row of zeros: refuse to start instead.
for t in ip iptables iperf3 "$PY"; do
  command -v "$t" >/dev/null || { echo "$t missing: apt-get install iproute2 iptables iperf3 python3 (or run tests/run-all.sh once)" >&2; exit 1; }
done
for b in fwnode nfq-accept-all connrate sync-bench; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p fwnode -p keepstate-tests" >&2; exit 1; }
done
mkdir -p "/tmp/$P"

for ns in $C $G $S $B; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n $C link add ${P}c type veth peer name ${P}gl netns $G
ip -n $G link add ${P}gw type veth peer name ${P}s netns $S
ip -n $C link set ${P}c up; ip -n $G link set ${P}gl up; ip -n $G link set ${P}gw up; ip -n $S link set ${P}s up
ip -n $C addr add 198.51.100.10/24 dev ${P}c
ip -n $G addr add 198.51.100.1/24 dev ${P}gl
ip -n $G addr add 203.0.113.1/24 dev ${P}gw
ip -n $S addr add $SERVER/24 dev ${P}s
# The sync network between the gateway and its standby.
ip -n $G link add ${P}gy type veth peer name ${P}b netns $B
ip -n $G link set ${P}gy up; ip -n $B link set ${P}b up
ip -n $G addr add 198.18.0.1/24 dev ${P}gy
ip -n $B addr add 198.18.0.2/24 dev ${P}b
ip -n $C route add default via 198.51.100.1
ip -n $S route add default via 203.0.113.1
ip netns exec $G sysctl -qw net.ipv4.ip_forward=1
ip netns exec $C sysctl -qw net.ipv4.ip_local_port_range="10000 65000"

ip netns exec $S iperf3 -s -p 5201 >/dev/null 2>&1 & PIDS+=($!)
ip netns exec $S "$BIN/connrate" serve 7000 >/dev/null 2>&1 & PIDS+=($!)
sleep 0.5

measure() { # prints "gbps pps conn_per_s"
  local tcp udp conn
  tcp=$(ip netns exec $C timeout $((T + 10)) iperf3 -c $SERVER -p 5201 -t "$T" -J 2>/dev/null |
        $PY -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo 0)
  udp=$(ip netns exec $C timeout $((T + 10)) iperf3 -c $SERVER -p 5201 -u -l 64 -b 0 -t "$T" -J 2>/dev/null |
        $PY -c 'import json,sys; s=json.load(sys.stdin)["end"]["sum"]; print("%.0f" % ((s["packets"]-s["lost_packets"])/s["seconds"]))' || echo 0)
  conn=$(ip netns exec $C timeout $((T + 10)) "$BIN/connrate" run $SERVER:7000 "$T" 8 | cut -d' ' -f1 || echo 0)
  echo "$tcp $udp $conn"
}

gw_reset() { ip netns exec $G iptables -F FORWARD; ip netns exec $G iptables -P FORWARD ACCEPT; }

declare -A R
[ -n "${PROFILE:-}" ] && ONLY_FWNODE=1
if [ -z "${ONLY_FWNODE:-}" ]; then
echo "measuring kernel forwarding (no rules) ..." >&2
R[kernel]=$(measure)

echo "measuring kernel iptables stateful rules ..." >&2
ip netns exec $G iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
ip netns exec $G iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP
ip netns exec $G iptables -A FORWARD -p tcp -m multiport --dports 5201,7000 -m conntrack --ctstate NEW -j ACCEPT
ip netns exec $G iptables -A FORWARD -p udp --dport 5201 -m conntrack --ctstate NEW -j ACCEPT
ip netns exec $G iptables -P FORWARD DROP
R[stateful]=$(measure)
gw_reset

for mode in nogso gso; do
  echo "measuring accept-all NFQUEUE loop ($mode) ..." >&2
  flag=""; [ $mode = nogso ] && flag="--no-gso"
  ip netns exec $G "$BIN/nfq-accept-all" --queue 0 $flag --seconds $((6 * T + 30)) 2>"/tmp/$P/nfq-$mode.log" & pid=$!; PIDS+=($pid)
  sleep 0.3
  ip netns exec $G iptables -A FORWARD -j NFQUEUE --queue-num 0
  R[nfq-$mode]=$(measure)
  kill $pid; wait $pid 2>/dev/null || true
  gw_reset
done

for q in 1 2; do
  echo "measuring the best-case NFQUEUE loop ($q queue(s)) ..." >&2
  ip netns exec $G "$BIN/nfq-accept-all" --best --queues $q --seconds $((6 * T + 30)) 2>"/tmp/$P/nfq-best-$q.log" & pid=$!; PIDS+=($pid)
  sleep 0.3
  if [ $q = 1 ]; then
    ip netns exec $G iptables -A FORWARD -j NFQUEUE --queue-num 0
  else
    ip netns exec $G iptables -A FORWARD -j NFQUEUE --queue-balance 0:$((q - 1))
  fi
  R[best-$q]=$(measure)
  kill $pid; wait $pid 2>/dev/null || true
  gw_reset
done
fi

# fwnode: tracking + a 50-rule policy (48 that do not match, then the real ones).
{
  echo 'default = "drop"'
  printf '[[rule]]\nct = ["established", "related"]\naction = "accept"\n'
  for i in $(seq 1 46); do
    printf '[[rule]]\nsrc = "198.51.100.%d"\nproto = "tcp"\ndport = %d\nct = "new"\naction = "drop"\n' $((100 + i)) $((20000 + i))
  done
  printf '[[rule]]\nct = "invalid"\naction = "drop"\n'
  printf '[[rule]]\nproto = "tcp"\ndport = [5201, 7000]\nct = "new"\naction = "accept"\n'
  printf '[[rule]]\nproto = "udp"\ndport = 5201\nct = "new"\naction = "accept"\n'
} > "/tmp/$P/policy.toml"
setups="1 2 1r"
[ -n "${PROFILE:-}" ] && { setups=1; mkdir -p "$PROFILE"; }
for setup in $setups; do
  q=${setup%r} replicate=""
  [ "$setup" = 1r ] && replicate=1
  echo "measuring fwnode ($q queue(s)${replicate:+, replicating to a standby}) ..." >&2
  if [ -n "$replicate" ]; then
    ip netns exec $B timeout $((6 * T + 60)) "$BIN/sync-bench" recv 2 198.18.0.2:7401 1 198.18.0.1:7401 1000000000 \
      >/dev/null 2>"/tmp/$P/standby.err" & PIDS+=($!)
  fi
  cat > "/tmp/$P/fwnode.toml" <<EOF
[node]
name = "bench"
[datapath]
chain = "$P"
queues = $q
stats_file = "/tmp/$P/stats.json"
[conntrack]
helper_ports = []
[policy]
file = "/tmp/$P/policy.toml"
EOF
  if [ -n "$replicate" ]; then
    cat >> "/tmp/$P/fwnode.toml" <<EOF
[cluster]
id = 1
listen = "198.18.0.1:7400"
data_dir = "/tmp/$P/raft"
# The standby is not a Raft member of this one-node cluster, so mTLS would refuse it.
[tls]
plaintext = true
[sync]
listen = "198.18.0.1:7401"
peers = [{ id = 2, addr = "198.18.0.2:7401" }]
EOF
  fi
  rm -f "/tmp/$P/stats.json"
  ip netns exec $G "$BIN/fwnode" --config "/tmp/$P/fwnode.toml" 2>"/tmp/$P/fwnode-$q.log" & pid=$!; PIDS+=($pid)
  for _ in $(seq 100); do [ -f "/tmp/$P/stats.json" ] && break; sleep 0.1; done
  if [ -n "${PROFILE:-}" ]; then
    packets() { $PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"]["keepstate_packets_total"]["samples"][0]["value"])' "/tmp/$P/stats.json"; }
    for kind in udp conn; do
      sleep 0.5; before=$(packets)
      perf record -e cpu-clock -F 999 -a -g -o "$PROFILE/$kind.data" -- sleep "$T" >/dev/null 2>&1 & perf_pid=$!
      if [ $kind = udp ]; then
        ip netns exec $C timeout $((T + 10)) iperf3 -c $SERVER -p 5201 -u -l 64 -b 0 -t "$T" >/dev/null 2>&1 || true
      else
        ip netns exec $C timeout $((T + 10)) "$BIN/connrate" run $SERVER:7000 "$T" 8 >/dev/null || true
      fi
      wait $perf_pid || true
      sleep 0.5; n=$(( $(packets) - before ))
      perf script -i "$PROFILE/$kind.data" 2>/dev/null | inferno-collapse-perf > "$PROFILE/$kind.folded"
      inferno-flamegraph --title "fwnode, 1 queue: $kind load (system-wide, $T s)" \
        < "$PROFILE/$kind.folded" > "$PROFILE/$kind.svg" || true
      $PY tests/perf-stages.py "$PROFILE/$kind.folded" "$T" "$(nproc)" "$n" "$kind load"
      echo
    done
    R[fwnode-$setup]="0 0 0"
  else
    R[fwnode-$setup]=$(measure)
  fi
  sleep 0.5
  cp "/tmp/$P/stats.json" "/tmp/$P/stats-$setup.json"
  [ -n "${ONLY_FWNODE:-}" ] && [ -z "${PROFILE:-}" ] && { echo "${R[fwnode-$setup]}"; $PY -m json.tool "/tmp/$P/stats-$setup.json"; }
  kill $pid; wait $pid 2>/dev/null || true
  ip netns exec $G "$BIN/fwnode" --config "/tmp/$P/fwnode.toml" --remove-rules >/dev/null
done

[ -n "${ONLY_FWNODE:-}" ] && exit 0
$PY - "$T" "/tmp/$P" <<EOF
import datetime, json, os, sys
r = {k: list(map(float, v.split())) for k, v in {
    "kernel forwarding, no rules": "${R[kernel]}",
    "kernel iptables stateful": "${R[stateful]}",
    "accept-all NFQUEUE, no GSO": "${R[nfq-nogso]}",
    "accept-all NFQUEUE, GSO": "${R[nfq-gso]}",
    "best-case NFQUEUE loop, 1 queue": "${R[best-1]}",
    "best-case NFQUEUE loop, 2 queues": "${R[best-2]}",
    "fwnode, 1 queue": "${R[fwnode-1]}",
    "fwnode, 2 queues": "${R[fwnode-2]}",
    "fwnode, 1 queue, replicating to a standby": "${R[fwnode-1r]}",
}.items()}
k, s, n0, n1 = (r[x] for x in ["kernel forwarding, no rules", "kernel iptables stateful", "accept-all NFQUEUE, no GSO", "accept-all NFQUEUE, GSO"])
print(f"| setup ({sys.argv[1]} s each) | TCP Gbit/s | UDP 64 B pkt/s | new TCP conn/s |")
print("|---|---:|---:|---:|")
for name, (g, p, c) in r.items():
    print(f"| {name} | {g:.2f} | {p:,.0f} | {c:,.0f} |")
print()
ratio = lambda a, b: (a / b) if b else float("nan")
mark = lambda v, t: "ok" if v >= t else "MISSED"
for q in ("1", "2"):
    sfx = "s" if q == "2" else ""
    g, p, c = r[f"fwnode, {q} queue{sfx}"]
    b = r[f"best-case NFQUEUE loop, {q} queue{sfx}"]
    ms = json.load(open(f"{sys.argv[2]}/stats-{q}.json"))["metrics"]
    one = lambda n, **l: sum(x["value"] for x in ms[n]["samples"] if all(x["labels"].get(k) == v for k, v in l.items()))
    st = {"gso_packets": one("keepstate_gso_packets_total"), "max_batch": one("keepstate_nfqueue_batch_max_packets"),
          "verdict_messages": one("keepstate_nfqueue_verdict_messages_total"), "packets": one("keepstate_packets_total"),
          "enobufs": one("keepstate_nfqueue_errors_total", kind="enobufs")}
    print(f"fwnode {q} queue(s): TCP {ratio(g, n1[0]):.2f}x accept-all+GSO, {ratio(g, k[0]):.2f}x kernel; "
          f"UDP pps {ratio(p, n0[1]):.2f}x one-verdict loop; conn/s {ratio(c, s[2]):.2f}x kernel stateful; "
          f"GSO packets {st['gso_packets']}, max batch {st['max_batch']}, verdict msgs/packet "
          f"{st['verdict_messages'] / max(st['packets'], 1):.3f}, ENOBUFS {st['enobufs']}")
    print(f"  against the best-case loop with {q} queue(s): TCP {ratio(g, b[0]):.2f}x, UDP pps {ratio(p, b[1]):.2f}x, "
          f"conn/s {ratio(c, b[2]):.2f}x")
    # The targets of issue 12 (same run).
    for name, v, t in [
        ("new conn/s vs one-verdict loop", ratio(c, n0[2]), 1.5),
        ("new conn/s vs kernel stateful", ratio(c, s[2]), 0.75),
        ("UDP pps vs one-verdict loop", ratio(p, n0[1]), 1.5),
        ("UDP pps vs best-case loop", ratio(p, b[1]), 0.9),
        ("TCP vs kernel stateful", ratio(g, s[0]), 0.9),
    ]:
        print(f"  target {name}: {v:.2f}x (>= {t}x) {mark(v, t)}")
g, p, c = r["fwnode, 1 queue, replicating to a standby"]
g1, p1, c1 = r["fwnode, 1 queue"]
learned = [l.split()[1] for l in open(f"{sys.argv[2]}/standby.err") if l.startswith("learned ")]
b1 = r["best-case NFQUEUE loop, 1 queue"]
print(f"fwnode replicating (1 queue): conn/s {ratio(c, n0[2]):.2f}x one-verdict loop, {ratio(c, s[2]):.2f}x kernel stateful; "
      f"UDP pps {ratio(p, n0[1]):.2f}x one-verdict loop, {ratio(p, b1[1]):.2f}x best-case; TCP {ratio(g, s[0]):.2f}x kernel stateful")
print(f"replication on / off (1 queue): TCP {g / g1:.2f}x, UDP pps {p / p1:.2f}x, conn/s {c / c1:.2f}x; "
      f"the standby held {learned[-1] if learned else 'NOTHING'} entries at its last report")
# The same results as data (for tests/plot.py ratios), when asked for.
out = os.environ.get("KEEPSTATE_BENCH_OUT")
if out:
    doc = {
        "bench": "tests/bench-datapath.sh",
        "seconds_each": float(sys.argv[1]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "setups": [{"name": n, "tcp_gbps": v[0], "udp_pps": v[1], "conn_per_s": v[2]} for n, v in r.items()],
        "standby_learned": int(learned[-1]) if learned else 0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"results written to {out}")
EOF
