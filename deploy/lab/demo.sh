#!/usr/bin/env bash
# keepstate lab demo: an active/standby gateway pair carrying an FTP download and a TCP stream
# through a crash of the active gateway, all in network namespaces this script creates and removes.
#
#   client ── [lan switch] ──┬── gw1 ──┬── [wan switch] ── server
#   198.51.100.10            ├── gw2 ──┤                   203.0.113.10
#   2001:db8:1::10           │         │                   2001:db8:2::10
#        VIPs 198.51.100.1, 2001:db8:1::1 │ 203.0.113.1, 2001:db8:2::1 (keepalived, VRRPv3)
#   management/sync switch 198.18.0.0/24: gw1 .1, gw2 .2, witness .3, operator (ops) .100
#
# gw1 and gw2 run fwnode with state replication ([sync]) and real keepalived rendered from
# deploy/keepalived/; the witness is the third Raft voter; every gRPC port is mTLS with a CA and
# certificates made by `fwctl certs` for this run. The script forms the cluster, applies
# deploy/lab/policy.toml, shows allowed and denied traffic, starts an active-mode FTP download
# (rate-limited so it is in flight) and an iperf3 stream, crashes gw1 (links down, SIGKILL for
# keepalived and fwnode), shows both carrying on through gw2, brings gw1 back (it bulk-syncs and
# takes the VIPs back), then shows a policy change with diff, history and rollback.
# It exits non-zero if the download or the stream does not survive, or the VIPs do not move.
#
# Usage (as root, from anywhere in the repository):
#   bash deploy/lab/demo.sh                 run the demo and remove the lab
#   bash deploy/lab/demo.sh --keep          leave the lab up afterwards (prints how to use it)
#   bash deploy/lab/demo.sh --down [PREFIX] remove a kept lab (default: the last one kept)
# Binaries: $KEEPSTATE_BIN_DIR/{fwnode,fwctl} if set, else `cargo build --release` here.
# DEMO_SYNC=off runs the gateways without replication: a negative control (the download and
# the stream die at the crash and the script fails); tests/tests/demo.rs uses it.
#
# Nothing is changed outside the lab's namespaces: no link or route into the root namespace, no
# firewall rule there. keepalived is started from the root namespace with `--namespace` (see
# deploy/keepalived/keepalived.conf.tmpl for why) and lives in its gateway's namespace. On any
# exit the script stops the processes it started (by PID, and whatever runs in its own
# namespaces) and deletes its namespaces and temp dir, unless --keep was asked and it succeeded.
set -euo pipefail
cd "$(dirname "$0")/../.."
LAST=/tmp/keepstate-demo.last   # the prefix of the last kept lab
labdir() { echo "/tmp/keepstate-demo-$1"; }
HOSTS="client lan gw1 gw2 wan server witness ops"

# Remove lab PREFIX: its processes (recorded PIDs whose command line names the lab's dir, then
# anything still running inside its namespaces), its namespaces, its dir.
teardown() {
  local p=$1 d pid ns
  d=$(labdir "$p")
  if [ -f "$d/pids" ]; then
    while read -r pid; do
      if grep -qF "$d" "/proc/$pid/cmdline" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
    done < "$d/pids"
    sleep 0.3
  fi
  for ns in $HOSTS; do
    ip netns pids "$p-$ns" 2>/dev/null | while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done
  done
  for ns in $HOSTS; do ip netns del "$p-$ns" 2>/dev/null || true; done
  rm -rf "$d"
}

KEEP=0
case "${1:-}" in
  --keep) KEEP=1 ;;
  --down)
    [ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
    p=${2:-$(cat "$LAST" 2>/dev/null || true)}
    [[ "$p" =~ ^kd[0-9]+$ ]] || { echo "no kept lab: give its prefix (kdNNNN, see ip netns list)" >&2; exit 2; }
    teardown "$p"
    [ "$(cat "$LAST" 2>/dev/null || true)" = "$p" ] && rm -f "$LAST"
    echo "lab $p removed"
    exit 0 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--keep | --down [PREFIX]]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)" >&2; exit 1; }

need=()
for pair in iptables:iptables ip:iproute2 vsftpd:vsftpd curl:curl ping:iputils-ping \
            keepalived:keepalived iperf3:iperf3 sha256sum:coreutils; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
[ -x /usr/bin/python3 ] || need+=(python3)   # the lab's web servers
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ -n "${KEEPSTATE_BIN_DIR:-}" ]; then
  BIN=$(cd "$KEEPSTATE_BIN_DIR" && pwd)
else
  cargo build --release -q -p fwnode -p fwctl
  BIN=$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)
fi
for b in fwnode fwctl; do [ -x "$BIN/$b" ] || { echo "$BIN/$b missing" >&2; exit 1; }; done
KA_SCRIPTS=$PWD/deploy/keepalived
SYNC=${DEMO_SYNC:-on}

P="kd$$"
D=$(labdir "$P")
rm -rf "$D"; mkdir -p "$D"; chmod 700 "$D"
: > "$D/pids"
ok=0
cleanup() {
  if [ "$KEEP" = 1 ] && [ "$ok" = 1 ]; then return; fi
  disown -a 2>/dev/null || true   # no "Killed" job notices for what teardown stops
  teardown "$P"
}
trap cleanup EXIT
trap 'echo "interrupted: removing the lab" >&2; exit 130' INT TERM
spawn() { "$@" & echo $! >> "$D/pids"; LASTPID=$!; }   # start in the background, record its PID

B=$'\033[1m' N=$'\033[0m'
[ -t 1 ] || { B=; N=; }
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
say() { printf -- '-> %s\n' "$*"; }
die() { printf '!! %s\n' "$*" >&2; exit 1; }
# The words of a command as one would type them (quoted where needed).
words() { local a out=; for a; do [[ $a =~ [[:space:]\\\'\"\$\|\&\;\<\>\(\)\*\?] ]] && a="'$a'"; out+="$a "; done; printf '%s' "${out% }"; }
on() { local h=$1; shift; printf '[%s]$ %s\n' "$h" "$(words "$@")"; ip netns exec "$P-$h" "$@"; }   # echoed
nx() { local h=$1; shift; ip netns exec "$P-$h" "$@"; }                                  # quiet
T=$D/tls
# The operator's fwctl on the management switch; NODE picks the member it talks to.
ctl() { ip netns exec "$P-ops" env FWCTL_NODE="${NODE:-198.18.0.1:7400}" FWCTL_CA="$T/ca.crt" \
  FWCTL_CERT="$T/fwctl.crt" FWCTL_KEY="$T/fwctl.key" "$BIN/fwctl" "$@"; }
fwctl() { printf '[ops]$ fwctl %s%s\n' "${NODE:+--node $NODE }" "$(words "$@")"; ctl "$@"; }
# `fwctl ha ...` on a gateway itself (the HA socket is local and root only).
ha() { local g=$1; shift; printf '[%s]$ fwctl ha %s\n' "$g" "$(words "$@")"; nx "$g" "$BIN/fwctl" ha "$@" --ha-socket "$D/$g/ha.sock"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

step "the lab (prefix $P, files in $D)"
sed -n '4,9p' "$0" | sed 's/^#//'
for h in $HOSTS; do
  ip netns add "$P-$h"; ip -n "$P-$h" link set lo up
  nx "$h" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
# LAN and WAN switches: bridges with multicast snooping off (VRRP and NA reach every port).
nx lan ip link add "${P}bl" type bridge mcast_snooping 0; nx lan ip link set "${P}bl" up
nx wan ip link add "${P}bw" type bridge mcast_snooping 0; nx wan ip link set "${P}bw" up
nx ops ip link add "${P}br" type bridge; nx ops ip link set "${P}br" up
nx ops ip addr add 198.18.0.100/24 dev "${P}br"
link() { # host if switch port bridge
  nx "$1" ip link add "$2" type veth peer name "$4" netns "$P-$3"
  nx "$1" ip link set "$2" up; nx "$3" ip link set "$4" master "$5"; nx "$3" ip link set "$4" up
}
link client "${P}c" lan "${P}lc" "${P}bl"
link server "${P}s" wan "${P}ws" "${P}bw"
nx client ip addr add 198.51.100.10/24 dev "${P}c"; nx client ip -6 addr add 2001:db8:1::10/64 dev "${P}c" nodad
nx server ip addr add 203.0.113.10/24 dev "${P}s"; nx server ip -6 addr add 2001:db8:2::10/64 dev "${P}s" nodad
nx client ip route add default via 198.51.100.1; nx client ip -6 route add default via 2001:db8:1::1
nx server ip route add default via 203.0.113.1; nx server ip -6 route add default via 2001:db8:2::1
for i in 1 2; do
  g=gw$i o=$((i + 1))
  # The same interface names on both gateways: the cluster's one policy names them.
  link $g "${P}gl" lan "${P}l$i" "${P}bl"
  link $g "${P}gw" wan "${P}w$i" "${P}bw"
  nx $g ip addr add 198.51.100.$o/24 dev "${P}gl"; nx $g ip -6 addr add 2001:db8:1::$o/64 dev "${P}gl" nodad
  nx $g ip addr add 203.0.113.$o/24 dev "${P}gw"; nx $g ip -6 addr add 2001:db8:2::$o/64 dev "${P}gw" nodad
  nx $g sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
done
i=1
for h in gw1 gw2 witness; do
  link $h "${P}m" ops "${P}b$i" "${P}br"; nx $h ip addr add 198.18.0.$i/24 dev "${P}m"; i=$((i + 1))
done

step "a cluster CA, a certificate per member and one for the operator (fwctl certs)"
printf '$ fwctl certs --dir %s init\n' "$T"; "$BIN/fwctl" certs --dir "$T" init
for i in 1 2 3; do "$BIN/fwctl" certs --dir "$T" issue-node $i >/dev/null; done
printf '$ fwctl certs --dir %s issue-node 1|2|3\n' "$T"
printf '$ fwctl certs --dir %s issue-operator fwctl --role admin\n' "$T"
"$BIN/fwctl" certs --dir "$T" issue-operator fwctl --role admin

step "fwnode on gw1 and gw2 (gateways, replicating state to each other) and on the witness"
member() { # id host role
  local id=$1 h=$2 dir=$D/$2
  mkdir -p "$dir"
  {
    printf '[node]\nname = "%s"\n\n[datapath]\nchain = "%s"\nstats_file = "%s/stats.json"\n\n' "$h" "$P" "$dir"
    printf '[cluster]\nid = %s\nlisten = "198.18.0.%s:7400"\ndata_dir = "%s/data"\nrole = "%s"\n\n' "$id" "$id" "$dir" "$3"
    printf '[tls]\nca = "%s/ca.crt"\ncert = "%s/node-%s.crt"\nkey = "%s/node-%s.key"\n' "$T" "$T" "$id" "$T" "$id"
    if [ "$3" = gateway ]; then
      printf '\n[ha]\nsocket = "%s/ha.sock"\n' "$dir"
      # defer: a new connection's first packet leaves only once the other gateway has it.
      [ "$SYNC" = off ] || printf '\n[sync]\nlisten = "198.18.0.%s:7401"\npeers = [{ id = %s, addr = "198.18.0.%s:7401" }]\ndefer_ms = 20\n' \
        "$id" $((3 - id)) $((3 - id))
    fi
  } > "$dir/fwnode.toml"
}
start_member() { # id host
  spawn ip netns exec "$P-$2" "$BIN/fwnode" --config "$D/$2/fwnode.toml" >>"$D/$2/fwnode.log" 2>&1
  eval "FWNODE_$1=$LASTPID"
  for _ in $(seq 150); do
    if NODE=198.18.0.$1:7400 ctl status >/dev/null 2>&1; then
      # A gateway's HA socket is served once its datapath forwards.
      [ "$2" = witness ] || [ -S "$D/$2/ha.sock" ] && return
    fi
    kill -0 "$LASTPID" 2>/dev/null || { tail -20 "$D/$2/fwnode.log" >&2; die "fwnode on $2 exited"; }
    sleep 0.1
  done
  die "fwnode on $2 does not answer"
}
member 1 gw1 gateway; member 2 gw2 gateway; member 3 witness witness
[ "$SYNC" = off ] && say "DEMO_SYNC=off: no [sync] section, the gateways do NOT replicate state (negative control)"
echo "gw1's config ($D/gw1/fwnode.toml):"; sed 's/^/    /' "$D/gw1/fwnode.toml"
start_member 1 gw1; start_member 2 gw2; start_member 3 witness

step "form the cluster through gw1, apply deploy/lab/policy.toml through gw2"
fwctl cluster init
fwctl --timeout 30 cluster add 2 198.18.0.2:7400 --name gw2
fwctl --timeout 30 cluster add 3 198.18.0.3:7400 --name witness --role witness
fwctl cluster promote 2
fwctl cluster promote 3
sed "s/@LAN/${P}gl/" deploy/lab/policy.toml > "$D/policy.toml"
NODE=198.18.0.2:7400 fwctl policy apply "$D/policy.toml" --comment "lab policy"
fwctl cluster members

step "keepalived on both gateways, rendered from deploy/keepalived/keepalived.conf.tmpl"
render() { # gw priority own-sync-octet peer-sync-octet
  sed -e "s/{{ name }}/$1/; s/{{ priority }}/$2/; s/{{ advert_int }}/0.1/" \
      -e "s/{{ sync_if }}/${P}m/g; s/{{ sync_src }}/198.18.0.$3/; s/{{ sync_peer }}/198.18.0.$4/" \
      -e "s/{{ vrid_sync }}/53/; s#{{ sync_vip4 }}#198.18.0.254/24#" \
      -e "s/{{ lan_if }}/${P}gl/g; s/{{ wan_if }}/${P}gw/g; s/{{ vrid_lan }}/51/; s/{{ vrid_wan }}/52/" \
      -e "s#{{ lan_vip4 }}#198.51.100.1/24#; s#{{ wan_vip4 }}#203.0.113.1/24#" \
      -e "s#{{ lan_vip6 }}#2001:db8:1::1/64 dev ${P}gl#; s#{{ wan_vip6 }}#2001:db8:2::1/64 dev ${P}gw#" \
      -e "s#{{ fwnode_bin }}#$BIN/fwnode#; s#{{ fwnode_config }}#$D/$1/fwnode.toml#" \
      -e "s#{{ fwctl }}#$BIN/fwctl#g; s#{{ ha_socket }}#$D/$1/ha.sock#g" \
      -e "s#{{ script_dir }}#$KA_SCRIPTS#g; s#{{ check_weight }}#50#" \
      deploy/keepalived/keepalived.conf.tmpl > "$D/$1/keepalived.conf"
  if grep -v '^ *#' "$D/$1/keepalived.conf" | grep -q '{{'; then die "unrendered placeholder in $D/$1/keepalived.conf"; fi
  keepalived -t -l --namespace "$P-$1" -f "$D/$1/keepalived.conf" >/dev/null 2>&1 \
    || die "keepalived -t rejects $D/$1/keepalived.conf"
}
start_keepalived() { # gw
  local k=$D/$1/ka
  rm -f "$k.pid" "$k-vrrp.pid" "$k-chk.pid"
  spawn keepalived --dont-fork --log-console --log-detail --vrrp --namespace "$P-$1" -f "$D/$1/keepalived.conf" \
    -p "$k.pid" -r "$k-vrrp.pid" -c "$k-chk.pid" >>"$D/$1/keepalived.log" 2>&1 </dev/null
  eval "KA_${1#gw}=$LASTPID"
}
has_vips() { # gw: does it hold all four VIPs?
  local a; a=$(ip -n "$P-$1" -o addr show 2>/dev/null) || return 1
  for v in 198.51.100.1/ 203.0.113.1/ 2001:db8:1::1/ 2001:db8:2::1/; do [[ $a == *" $v"* ]] || return 1; done
}
wait_vips() { # gw other timeout_s: until gw holds the VIPs and other (if not "-") none
  local end; end=$(awk -v t="$3" -v n="$(now)" 'BEGIN { printf "%.3f", n + t }')
  while :; do
    if has_vips "$1" && { [ "$2" = - ] || ! ip -n "$P-$2" -o addr show 2>/dev/null | grep -q ' 198.51.100.1/'; }; then return 0; fi
    awk -v e="$end" -v n="$(now)" 'BEGIN { exit !(n > e) }' && return 1
    sleep 0.02
  done
}
wait_ready() { # gw timeout_s: until `fwctl ha check` passes (synced with its peer)
  for _ in $(seq $(($2 * 10))); do nx "$1" "$BIN/fwctl" ha check --ha-socket "$D/$1/ha.sock" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
render gw1 110 1 2; render gw2 100 2 1
echo "gw1: priority 110, gw2: 100; \`fwctl ha check\` (synced?) weighs 50; VRRPv3 adverts every 0.1 s"
grep -v '^ *#' "$D/gw1/keepalived.conf" | grep -E 'vrrp_version|process "|script "|weight -|notify_master|priority|advert_int' \
  | sed 's/^ */    /' | awk '!seen[$0]++'
for g in gw1 gw2; do wait_ready $g 20 || die "$g is not in sync with its peer"; done
start_keepalived gw1
wait_vips gw1 - 10 || die "gw1 did not take the VIPs"
start_keepalived gw2
sleep 1
{ has_vips gw1 && ! has_vips gw2; } || die "the VIPs are not (only) on gw1"
say "gw1 holds the VIPs 198.51.100.1, 203.0.113.1, 2001:db8:1::1, 2001:db8:2::1"
ha gw1 status
ha gw2 status

step "traffic through the pair: allowed, denied, rejected, unsolicited"
spawn ip netns exec "$P-server" /usr/bin/python3 -m http.server 8080 >/dev/null 2>&1
spawn ip netns exec "$P-server" /usr/bin/python3 -m http.server 9090 >/dev/null 2>&1
for _ in $(seq 50); do nx server ss -Hltn 'sport = :9090' | grep -q . && break; sleep 0.1; done
on client curl -sS -o /dev/null -w '%{http_code}\n' --max-time 3 http://203.0.113.10:8080/
on client curl -sS -o /dev/null --max-time 1 http://203.0.113.10:9090/ 2>/dev/null || say "port 9090: dropped (not in the policy)"
on client curl -sS -o /dev/null --max-time 2 http://203.0.113.10:22/ 2>/dev/null || say "port 22: refused at once by the gateway's REJECT"
on server curl -sS -o /dev/null --max-time 1 http://198.51.100.10:8080/ 2>/dev/null || say "server -> client: dropped (nothing comes in unasked)"
on client ping -c 2 -i 0.2 -W 1 -q 203.0.113.10

step "an FTP download (active mode: only the FTP helper lets the data connection in) and an iperf3 stream"
mkdir -p "$D/ftp" "$D/empty"; chmod 755 "$D/ftp"
head -c 16000000 /dev/urandom > "$D/ftp/release.tar"
RATE=2000000
cat > "$D/vsftpd.conf" <<CONF
listen=YES
background=NO
anonymous_enable=YES
local_enable=NO
no_anon_password=YES
anon_root=$D/ftp
anon_max_rate=$RATE
connect_from_port_20=YES
seccomp_sandbox=NO
secure_chroot_dir=$D/empty
xferlog_enable=NO
isolate=NO
isolate_network=NO
CONF
spawn ip netns exec "$P-server" /usr/sbin/vsftpd "$D/vsftpd.conf" >/dev/null 2>&1
spawn ip netns exec "$P-server" iperf3 -s -1 -p 5201 -i 0.5 --forceflush -f k >"$D/iperf-server.log" 2>&1
for _ in $(seq 50); do nx server ss -Hltn 'sport = :21 or sport = :5201' | grep -c . | grep -q 2 && break; sleep 0.1; done
SHA_SERVER=$(sha256sum "$D/ftp/release.tar" | cut -d' ' -f1)
echo "server: release.tar, 16 MB, sent at $((RATE / 1000000)) MB/s (vsftpd anon_max_rate), sha256 $SHA_SERVER"
STREAM_S=18
printf '[client]$ curl --ftp-port - --disable-eprt -o release.tar ftp://203.0.113.10/release.tar &\n'
spawn ip netns exec "$P-client" curl -sS --max-time 60 --speed-limit 1 --speed-time 8 --ftp-port - --disable-eprt \
  -o "$D/got.tar" ftp://203.0.113.10/release.tar 2>"$D/curl.log"
CURL=$LASTPID
printf '[client]$ iperf3 -c 203.0.113.10 -t %s -b 10M -i 0.5 &   (the server prints what it receives)\n' "$STREAM_S"
spawn ip netns exec "$P-client" timeout $((STREAM_S + 30)) iperf3 -c 203.0.113.10 -p 5201 -t $STREAM_S -b 10M \
  -i 0.5 --connect-timeout 3000 >"$D/iperf-client.log" 2>&1
IPERF=$LASTPID
got() { stat -c %s "$D/got.tar" 2>/dev/null || echo 0; }
intervals() { grep -E '^\[ *[0-9]+\] +[0-9.]+-[0-9.]+ +sec' "$D/iperf-server.log" | grep -v -e sender -e receiver || true; }
for _ in $(seq 100); do [ "$(got)" -ge 4000000 ] && [ "$(intervals | wc -l)" -ge 4 ] && break; sleep 0.1; done
[ "$(got)" -ge 4000000 ] || { cat "$D/curl.log"; die "the download did not start"; }
say "client has $(got) of 16000000 bytes; iperf3 receives:"
intervals | tail -2
fwctl ct list --proto tcp
echo "gw2 holds the same connections, learned from gw1 (flag P) over the sync stream:"
NODE=198.18.0.2:7400 fwctl ct list --proto tcp --origin peer
fwctl sync status

step "CRASH of gw1: frozen, links down, then SIGKILL for its keepalived and fwnode (no goodbye)"
# Frozen first: keepalived would otherwise see a link go down and send a goodbye (priority 0)
# advert on the others before they are down too, a gentler failure than a crash.
vrrp=$(cat "$D/gw1/ka-vrrp.pid" 2>/dev/null || true)
gone="$KA_1 ${vrrp:+$vrrp }$FWNODE_1"
# shellcheck disable=SC2086 # $gone: a list of PIDs
kill -STOP $gone 2>/dev/null || true
nx gw1 ip link set "${P}gl" down; nx gw1 ip link set "${P}gw" down; nx gw1 ip link set "${P}m" down
CRASH=$(now); AT_CRASH=$(intervals | wc -l); GOT_AT_CRASH=$(got)
disown "$KA_1" "$FWNODE_1"   # no "Killed" job notice
# shellcheck disable=SC2086
kill -KILL $gone 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$FWNODE_1" 2>/dev/null || break; sleep 0.1; done
echo "\$ kill -STOP $gone        # keepalived of gw1 (and its VRRP child), fwnode of gw1"
echo "[gw1]$ ip link set ${P}gl down; ip link set ${P}gw down; ip link set ${P}m down"
echo "\$ kill -KILL $gone"
wait_vips gw2 - 5 || die "gw2 did not take the VIPs"
say "gw2 holds the VIPs $(since "$CRASH") s after the crash (client had $GOT_AT_CRASH bytes)"
sleep 1
ha gw2 status
for _ in $(seq 50); do   # Raft: gw2 and the witness elect a new leader
  l=$(NODE=198.18.0.2:7400 ctl -o json status 2>/dev/null | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["raft"]["leader_id"])' 2>/dev/null || true)
  [ -n "$l" ] && [ "$l" != 0 ] && [ "$l" != 1 ] && break; sleep 0.1
done
NODE=198.18.0.2:7400 fwctl cluster members
sleep 1
NODE=198.18.0.2:7400 fwctl sync status
say "gw2 has lost its peer (the stream is down) and carries on alone"
echo "iperf3 server, every 0.5 s, from just before the crash:"
intervals | tail -n +"$((AT_CRASH > 1 ? AT_CRASH - 1 : 1))" | head -8
flowing=$(intervals | tail -n +"$((AT_CRASH + 1))" | awk '$5 + 0 > 0' | wc -l)
stream_ok=1
if [ "$flowing" -gt 0 ]; then
  say "the stream flows through gw2 ($flowing intervals with data since the crash)"
else
  stream_ok=0; echo "!! the iperf3 stream does not flow through gw2"   # fails below, after the download
fi
echo "the download carries on: client has $(got) bytes"

step "the download completes through gw2"
rc=0; wait "$CURL" || rc=$?
[ "$rc" = 0 ] || { cat "$D/curl.log"; die "the FTP download failed (curl exit $rc) after $(got) bytes"; }
SHA_CLIENT=$(sha256sum "$D/got.tar" | cut -d' ' -f1)
printf '[client]$ sha256sum release.tar\n%s\n[server]$ sha256sum release.tar\n%s\n' "$SHA_CLIENT" "$SHA_SERVER"
[ "$SHA_CLIENT" = "$SHA_SERVER" ] || die "sha256 differs: the download is damaged"
say "sha256 match: the download survived the crash intact"
[ "$stream_ok" = 1 ] || die "the iperf3 stream did not survive the crash"

step "gw1 returns: fwnode restarts empty, rejoins the cluster, bulk-syncs from gw2, then takes the VIPs back"
for a in 198.51.100.1/24:"${P}gl" 203.0.113.1/24:"${P}gw" 2001:db8:1::1/64:"${P}gl" 2001:db8:2::1/64:"${P}gw"; do
  nx gw1 ip addr del "${a%%:*}" dev "${a#*:}" 2>/dev/null || true   # left by the killed keepalived
done
nx gw1 ip link set "${P}gl" up; nx gw1 ip link set "${P}gw" up; nx gw1 ip link set "${P}m" up
BACK=$(now)
rm -f "$D/gw1/ha.sock"   # the crashed fwnode's (a new one replaces it anyway; we wait for the new one)
start_member 1 gw1
start_keepalived gw1
ha gw1 status
wait_vips gw1 gw2 30 || die "gw1 did not take the VIPs back"
say "gw1 has taken back the VIPs $(since "$BACK") s after its restart (once its bulk sync was done)"
AT_BACK=$(intervals | wc -l)
kill -0 "$IPERF" 2>/dev/null && say "(the iperf3 stream is still running)"
for _ in $(seq 30); do   # keepalived's notify_master reaches fwnode just after the VIPs moved
  nx gw1 "$BIN/fwctl" -o json ha status --ha-socket "$D/gw1/ha.sock" 2>/dev/null | grep -q '"role": "active"' && break
  sleep 0.1
done
ha gw1 status
ha gw2 status
fwctl sync status
rc=0; wait "$IPERF" || rc=$?
[ "$rc" = 0 ] || { tail -5 "$D/iperf-client.log"; die "iperf3 failed (exit $rc)"; }
echo "iperf3 server, every 0.5 s, around the failback:"
intervals | tail -n +"$((AT_BACK > 1 ? AT_BACK - 1 : 1))" | head -5
echo "iperf3 client, end of the run:"
grep -E 'sender|receiver' "$D/iperf-client.log" | tail -2
say "iperf3 finished without error: the stream lived through the crash and the failback"

step "policy: change, diff, history, rollback (the cluster keeps one version on every member)"
sed 's/dport = \[21, 80, 443, 5201, 8080\]/dport = [21, 80, 443, 5201, 8080, 9090]/' "$D/policy.toml" > "$D/policy2.toml"
fwctl policy diff "$D/policy2.toml" || true
echo "(an interface \"does not exist now\" warning comes from the Raft leader's check: the witness, when it leads, has no LAN)"
NODE=198.18.0.2:7400 fwctl policy apply "$D/policy2.toml" --comment "open 9090"
on client curl -sS -o /dev/null -w '%{http_code}\n' --max-time 2 http://203.0.113.10:9090/
fwctl policy history
fwctl policy rollback
on client curl -sS -o /dev/null --max-time 1 http://203.0.113.10:9090/ 2>/dev/null || say "port 9090 blocked again"
sed 's/dport = \[21, 80, 443, 5201, 8080\]/dport = ["www"]/' "$D/policy.toml" > "$D/bad.toml"
fwctl policy apply "$D/bad.toml" || say "exit $? : an invalid policy is refused with its position; nothing changed"
"$BIN/fwctl" certs --dir "$T" issue-operator alice --role read >/dev/null
printf '[ops]$ fwctl policy apply %s   # as alice: fwctl certs issue-operator alice --role read\n' "$D/policy2.toml"
nx ops "$BIN/fwctl" --node 198.18.0.1:7400 --ca "$T/ca.crt" --cert "$T/alice.crt" --key "$T/alice.key" \
  policy apply "$D/policy2.toml" 2>&1 || say "exit $? : a read-only operator may list, not change"
printf '[ops]$ fwctl status   # with a certificate of another CA\n'
"$BIN/fwctl" certs --dir "$D/other" init >/dev/null
"$BIN/fwctl" certs --dir "$D/other" issue-operator mallory --role admin >/dev/null
nx ops "$BIN/fwctl" --node 198.18.0.1:7400 --ca "$T/ca.crt" --cert "$D/other/mallory.crt" --key "$D/other/mallory.key" \
  status 2>&1 | tail -1 || true
say "refused at the TLS handshake"

cat > "$D/ops.rc" <<RC
export PATH="$BIN:\$PATH" FWCTL_NODE=198.18.0.1:7400 FWCTL_CA="$T/ca.crt" FWCTL_CERT="$T/fwctl.crt" FWCTL_KEY="$T/fwctl.key"
PS1='[ops] \w# '
RC
step "try by hand"
cat <<TXT
  Enter a host:   ip netns exec $P-ops bash --rcfile $D/ops.rc     (fwctl set up for the cluster)
                  ip netns exec $P-client bash      (also gw1, gw2, server, witness, lan, wan)
  fwctl status | ha settings | sync status | ct list --origin peer | policy history   (in ops)
  fwctl --node 198.18.0.2:7400 status                                   (ask gw2)
  $BIN/fwctl ha status --ha-socket $D/gw2/ha.sock                (in gw2: its HA role)
  curl -o /dev/null ftp://203.0.113.10/release.tar --limit-rate 1M      (in client; crash gw1 meanwhile:)
  ip -n $P-gw1 link set ${P}gl down; ip -n $P-gw1 link set ${P}gw down  (VIPs move to gw2 within ~0.4 s)
  ip -n $P-client neigh; iperf3 -c 203.0.113.10 -t 30                  (client: the VIP's MAC moves)
  Logs: $D/gw1/fwnode.log, $D/gw1/keepalived.log, ...
TXT

ok=1
if [ "$KEEP" = 1 ]; then
  echo "$P" > "$LAST"
  step "the lab stays up (--keep)"
  echo "  remove it with:  bash deploy/lab/demo.sh --down        (or --down $P)"
else
  step "done; the lab is removed on exit (run with --keep to leave it up)"
fi
