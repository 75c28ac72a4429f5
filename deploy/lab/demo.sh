#!/usr/bin/env bash
# keepstate lab demo: a gateway running fwnode between a client (LAN 198.51.100.0/24) and a
# server (WAN 203.0.113.0/24), all in network namespaces this script creates and removes (no host
# changes, nothing leaves the machine). Shows allowed and denied traffic, an FTP transfer whose
# data connection only the FTP helper can let through, a REJECT, and fwnode's counters.
# Run as root from the repository: bash deploy/lab/demo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)" >&2; exit 1; }

need=()
for pair in iptables:iptables ip:iproute2 vsftpd:vsftpd curl:curl ping:iputils-ping; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
cargo build --release -q -p fwnode

P="demo$$"; C=$P-client G=$P-gw S=$P-server
D=$(mktemp -d /tmp/keepstate-demo.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for ns in $C $G $S; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "building the lab: $C — $G — $S"
for ns in $C $G $S; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n $C link add ${P}c type veth peer name ${P}l netns $G
ip -n $G link add ${P}w type veth peer name ${P}s netns $S
ip -n $C link set ${P}c up; ip -n $G link set ${P}l up; ip -n $G link set ${P}w up; ip -n $S link set ${P}s up
ip -n $C addr add 198.51.100.10/24 dev ${P}c
ip -n $G addr add 198.51.100.1/24 dev ${P}l
ip -n $G addr add 203.0.113.1/24 dev ${P}w
ip -n $S addr add 203.0.113.10/24 dev ${P}s
ip -n $C route add default via 198.51.100.1
ip -n $S route add default via 203.0.113.1
ip netns exec $G sysctl -qw net.ipv4.ip_forward=1

step "server: a web server on :8080 and :9090, vsftpd (anonymous) on :21"
mkdir -p "$D/ftp" "$D/empty"; chmod 755 "$D/ftp"; head -c 2000000 /dev/urandom > "$D/ftp/release.tar"
cat > "$D/vsftpd.conf" <<CONF
listen=YES
background=NO
anonymous_enable=YES
local_enable=NO
no_anon_password=YES
anon_root=$D/ftp
connect_from_port_20=YES
seccomp_sandbox=NO
secure_chroot_dir=$D/empty
xferlog_enable=NO
CONF
ip netns exec $S /usr/sbin/vsftpd "$D/vsftpd.conf" >/dev/null 2>&1 & PIDS+=($!)
ip netns exec $S /usr/bin/python3 -m http.server 8080 >/dev/null 2>&1 & PIDS+=($!)
ip netns exec $S /usr/bin/python3 -m http.server 9090 >/dev/null 2>&1 & PIDS+=($!)

step "gateway: fwnode with deploy/lab/policy.toml"
sed "s/@LAN/${P}l/" deploy/lab/policy.toml > "$D/policy.toml"
cat > "$D/fwnode.toml" <<CONF
[node]
name = "demo-gw"
[datapath]
chain = "$P"
stats_file = "$D/stats.json"
[policy]
file = "$D/policy.toml"
CONF
ip netns exec $G target/release/fwnode --config "$D/fwnode.toml" 2>"$D/fwnode.log" & PIDS+=($!)
for _ in $(seq 50); do [ -f "$D/stats.json" ] && break; sleep 0.1; done
sleep 0.5
ip netns exec $G iptables -S "$P"

step "allowed: the client fetches http://203.0.113.10:8080/"
run ip netns exec $C curl -sS -o /dev/null -w '%{http_code} in %{time_total}s\n' http://203.0.113.10:8080/
step "denied by policy: port 9090 (times out after 2 s)"
ip netns exec $C curl -sS -o /dev/null --max-time 2 http://203.0.113.10:9090/ || echo "-> blocked, as the policy says"
step "rejected by policy: port 22 (the gateway answers with a TCP reset at once)"
ip netns exec $C curl -sS -o /dev/null --max-time 2 http://203.0.113.10:22/ || echo "-> refused by the gateway's REJECT"
step "unsolicited inbound: the server tries to reach the client"
ip netns exec $S curl -sS -o /dev/null --max-time 2 http://198.51.100.10:8080/ || echo "-> dropped"
step "ping out"
run ip netns exec $C ping -c 2 -i 0.2 -W 1 203.0.113.10
step "active FTP: the server opens the data connection back to the client; only the helper's RELATED expectation lets it in"
run ip netns exec $C curl -sS --max-time 10 --ftp-port - --disable-eprt -o "$D/got.tar" ftp://203.0.113.10/release.tar
cmp "$D/got.tar" "$D/ftp/release.tar" && echo "-> 2 MB received intact"
step "passive FTP (PASV)"
run ip netns exec $C curl -sS --max-time 10 --disable-epsv -o "$D/got2.tar" ftp://203.0.113.10/release.tar
cmp "$D/got2.tar" "$D/ftp/release.tar" && echo "-> 2 MB received intact"

sleep 0.5
step "fwnode's counters"
/usr/bin/python3 - "$D/stats.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
d, c, f = s["datapath"], s["conntrack"], s["ftp"]
print(f"packets {d['packets']}  accepted {d['accepted']}  dropped {d['dropped']}  rejected {d['rejected']}  GSO {d['gso_packets']}  max batch {d['max_batch']}")
print(f"connections now {c['connections']}  new {c['new']}  established {c['established']}  related {c['related']}")
print(f"ftp lines {f['lines']}  expectations {f['expectations']}  matched {c['expect_matched']}")
print("invalid:", {k: v for k, v in c["invalid"].items() if v})
PY
step "done; the lab is removed on exit"
