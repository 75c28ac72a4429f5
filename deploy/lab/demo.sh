#!/usr/bin/env bash
# keepstate lab demo: a three-member cluster — gateway gw1 (forwarding between a client on the LAN
# 198.51.100.0/24 and a server on the WAN 203.0.113.0/24), standby gateway gw2 and a witness —
# all in network namespaces this script creates and removes (no host changes, nothing leaves the
# machine). The members talk Raft over a management switch (198.18.0.0/24) where the operator's
# fwctl runs. Every gRPC port is mTLS with a CA and certificates made by `fwctl certs` for the run.
# Shows: forming the cluster, a policy applied through one member and enforced on the
# gateway, allowed/denied/rejected traffic, active and passive FTP through the helper, the
# connection table, a policy change, diff, history and rollback, and the counters.
# (Failover of the VIPs and of connection state arrives with state replication.)
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
cargo build --release -q -p fwnode -p fwctl

P="demo$$"; C=$P-client G=$P-gw1 G2=$P-gw2 W=$P-witness O=$P-ops S=$P-server
D=$(mktemp -d /tmp/keepstate-demo.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for ns in $C $G $G2 $W $O $S; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
FWCTL=$PWD/target/release/fwctl
# The run's cluster CA, a certificate per member and the operator's (admin role), in $D/tls.
T=$D/tls
# The operator's shell on the management switch; FWCTL_NODE picks the member fwctl talks to.
fwctl() { printf '$ fwctl %s\n' "$*"; ip netns exec $O env FWCTL_NODE="${NODE:-198.18.0.1:7400}" \
  FWCTL_CA="$T/ca.crt" FWCTL_CERT="$T/fwctl.crt" FWCTL_KEY="$T/fwctl.key" "$FWCTL" "$@"; }

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

step "management switch 198.18.0.0/24: gw1 .1, gw2 .2, witness .3, operator .100"
for ns in $G2 $W $O; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n $O link add ${P}br type bridge; ip -n $O link set ${P}br up; ip -n $O addr add 198.18.0.100/24 dev ${P}br
i=1
for ns in $G $G2 $W; do
  ip -n $ns link add ${P}m type veth peer name ${P}b$i netns $O
  ip -n $ns link set ${P}m up; ip -n $ns addr add 198.18.0.$i/24 dev ${P}m
  ip -n $O link set ${P}b$i master ${P}br; ip -n $O link set ${P}b$i up
  i=$((i + 1))
done
# gw2 stands by with the same interface names as gw1 (here without traffic).
ip -n $G2 link add ${P}l type veth peer name ${P}L; ip -n $G2 link add ${P}w type veth peer name ${P}W

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

step "a cluster CA, a certificate per member and one for the operator (fwctl certs)"
run "$FWCTL" certs --dir "$T" init
for i in 1 2 3; do "$FWCTL" certs --dir "$T" issue-node $i >/dev/null; done
run "$FWCTL" certs --dir "$T" issue-operator fwctl --role admin
ls -l "$T"

step "three fwnode members: gw1 and gw2 (gateways), witness (votes, forwards nothing)"
member() { # id netns role
  mkdir -p "$D/n$1"
  cat > "$D/n$1/fwnode.toml" <<CONF
[node]
name = "$(basename "$2" | sed "s/^$P-//")"
[datapath]
chain = "$P"
stats_file = "$D/n$1/stats.json"
[cluster]
id = $1
listen = "198.18.0.$1:7400"
data_dir = "$D/n$1/data"
role = "$3"
[tls]
ca = "$T/ca.crt"
cert = "$T/node-$1.crt"
key = "$T/node-$1.key"
CONF
  ip netns exec "$2" target/release/fwnode --config "$D/n$1/fwnode.toml" 2>"$D/n$1/fwnode.log" & PIDS+=($!)
}
member 1 $G gateway; member 2 $G2 gateway; member 3 $W witness
for i in 1 2 3; do
  for _ in $(seq 100); do ip netns exec $O "$FWCTL" --node 198.18.0.$i:7400 --ca "$T/ca.crt" --cert "$T/fwctl.crt" --key "$T/fwctl.key" status >/dev/null 2>&1 && break; sleep 0.1; done
done
echo "no policy committed yet: gw1 drops all forwarded traffic (fail closed)"
ip netns exec $C curl -sS -o /dev/null --max-time 1 http://203.0.113.10:8080/ 2>/dev/null || echo "-> blocked"

step "form the cluster through gw1"
fwctl cluster init
fwctl cluster add 2 198.18.0.2:7400 --name gw2
fwctl cluster add 3 198.18.0.3:7400 --name witness --role witness
fwctl cluster promote 2 >/dev/null
fwctl cluster promote 3

step "apply deploy/lab/policy.toml through gw2: forwarded to the leader, enforced everywhere"
sed "s/@LAN/${P}l/" deploy/lab/policy.toml > "$D/policy.toml"
NODE=198.18.0.2:7400 fwctl policy apply "$D/policy.toml" --comment "lab policy"
fwctl status
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

step "gw1's connection table (the FTP control and data connections, replies seen)"
fwctl ct list --proto tcp
fwctl ct count

step "a policy change: open :9090 too"
sed 's/dport = \[21, 80, 443, 8080\]/dport = [21, 80, 443, 8080, 9090]/' "$D/policy.toml" > "$D/policy2.toml"
fwctl policy diff "$D/policy2.toml" || true
NODE=198.18.0.3:7400 fwctl policy apply "$D/policy2.toml" --comment "open 9090"
run ip netns exec $C curl -sS -o /dev/null -w '%{http_code}\n' --max-time 2 http://203.0.113.10:9090/
fwctl policy history
fwctl policy rollback
ip netns exec $C curl -sS -o /dev/null --max-time 2 http://203.0.113.10:9090/ 2>/dev/null || echo "-> blocked again after the rollback"

step "an invalid policy is rejected with its position; nothing changes"
sed 's/dport = \[21, 80, 443, 8080\]/dport = ["www"]/' "$D/policy.toml" > "$D/bad.toml"
fwctl policy apply "$D/bad.toml" || echo "-> exit code $? (rejected)"
fwctl cluster members

step "roles: a read-only operator (alice) lists, but may not change the policy"
"$FWCTL" certs --dir "$T" issue-operator alice --role read >/dev/null
FWCTL_CERT_ALICE="$T/alice.crt" FWCTL_KEY_ALICE="$T/alice.key"
alice() { printf '$ fwctl %s   # as alice\n' "$*"; ip netns exec $O "$FWCTL" --node 198.18.0.1:7400 \
  --ca "$T/ca.crt" --cert "$FWCTL_CERT_ALICE" --key "$FWCTL_KEY_ALICE" "$@"; }
alice policy history
alice policy apply "$D/policy2.toml" || echo "-> exit code $? (permission denied)"
step "no certificate of the cluster CA: refused at the TLS handshake"
"$FWCTL" certs --dir "$D/other" init >/dev/null
"$FWCTL" certs --dir "$D/other" issue-operator mallory --role admin >/dev/null
printf '$ fwctl status   # with a certificate of another CA\n'
ip netns exec $O "$FWCTL" --node 198.18.0.1:7400 --ca "$T/ca.crt" --cert "$D/other/mallory.crt" \
  --key "$D/other/mallory.key" status || echo "-> exit code $? (refused)"

sleep 0.5
step "gw1's counters"
/usr/bin/python3 - "$D/n1/stats.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
d, c, f = s["datapath"], s["conntrack"], s["ftp"]
print(f"packets {d['packets']}  accepted {d['accepted']}  dropped {d['dropped']}  rejected {d['rejected']}  GSO {d['gso_packets']}  max batch {d['max_batch']}")
print(f"connections now {c['connections']}  new {c['new']}  established {c['established']}  related {c['related']}")
print(f"ftp lines {f['lines']}  expectations {f['expectations']}  matched {c['expect_matched']}")
print("invalid:", {k: v for k, v in c["invalid"].items() if v})
PY
step "done; the lab is removed on exit"
