#!/bin/sh
# keepalived notify hook for a keepstate gateway: tells fwnode its HA role.
#   notify.sh master|backup|fault|stop FWCTL HA_SOCKET
# master -> `fwctl ha promote`, backup/stop -> `fwctl ha demote`, fault -> `fwctl ha fault`.
#
# keepalived runs notify scripts without waiting for them, so this must be quick and must not
# hang: fwctl is bounded by `timeout`. A failure is logged (syslog tag keepstate-ha and stderr)
# and does not change what keepalived does with the VIPs: the addresses move whatever fwnode
# answers, and fwnode's own role only decides what it reports and whether it acts ACTIVE.
# The script exits with fwctl's status (124 when `timeout` cut it off): keepalived ignores it,
# it is for whoever runs the script by hand.
set -u
event=${1:-}
fwctl=${2:-/usr/local/bin/fwctl}
sock=${3:-/run/keepstate/ha.sock}

case "$event" in
  master) verb=promote ;;
  backup|stop) verb=demote ;;
  fault) verb=fault ;;
  *) echo "notify.sh: unknown event '$event'" >&2; exit 2 ;;
esac

# The status is taken right after the call: after `if out=$(...); then ... fi` $? would be the
# `if`'s own (0 when no branch ran), not fwctl's.
out=$(timeout 2 "$fwctl" ha "$verb" --ha-socket "$sock" 2>&1)
rc=$?
if [ "$rc" -eq 0 ]; then
  logger -t keepstate-ha "$event: fwctl ha $verb: ok ${out}" 2>/dev/null || true
  exit 0
fi
msg="$event: fwctl ha $verb failed (exit $rc): $out"
logger -t keepstate-ha -p daemon.warning "$msg" 2>/dev/null || true
echo "notify.sh: $msg" >&2
exit "$rc"
