#!/usr/bin/env bash
# Runs every keepstate test on a fresh Debian machine, as root:
#   formatting, clippy, unit/property tests, and the end-to-end tests in network namespaces.
# Installs what the tests need first (idempotent). Exits non-zero if anything fails.
# The end-to-end tests need root and network namespaces; they fail (never skip) without them.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# systemd: systemd-analyze (the unit's security rating) and the manager that tests/tests/systemd.rs
# runs as a confined user instance; on a machine where systemd is not PID 1 the package starts nothing.
for pair in iptables:iptables ip:iproute2 iperf3:iperf3 vsftpd:vsftpd lftp:lftp curl:curl \
            keepalived:keepalived tcpdump:tcpdump ping:iputils-ping mkfs.ext4:e2fsprogs \
            e2fsck:e2fsprogs losetup:mount nsenter:util-linux unshare:util-linux script:bsdutils \
            systemd-analyze:systemd dpkg-shlibdeps:dpkg-dev objcopy:binutils man:man-db; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need_apt+=("$pkg")
done
# The tests run Debian's interpreter, where python3-scapy installs.
/usr/bin/python3 -c 'import scapy' 2>/dev/null || need_apt+=(python3-scapy)
# The Ansible checks' venv (below) is made with Debian's interpreter.
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
/usr/bin/python3 -c 'import scapy' || { echo "scapy is not importable by /usr/bin/python3" >&2; exit 1; }
export KEEPSTATE_PYTHON=/usr/bin/python3
# Ansible for the role's checks (tests/tests/ansible.rs): ansible-core and ansible-lint with
# every dependency pinned (deploy/ansible/requirements-ci.txt), in a venv under target/; a venv
# made from the same file is left alone.
export KEEPSTATE_ANSIBLE_VENV="${KEEPSTATE_ANSIBLE_VENV:-$PWD/target/ansible-venv}"
ansible_reqs=deploy/ansible/requirements-ci.txt
if ! cmp -s "$ansible_reqs" "$KEEPSTATE_ANSIBLE_VENV/.keepstate-requirements"; then
  echo "== installing ansible-core and ansible-lint into $KEEPSTATE_ANSIBLE_VENV"
  if [ -e "$KEEPSTATE_ANSIBLE_VENV" ] && [ ! -f "$KEEPSTATE_ANSIBLE_VENV/pyvenv.cfg" ]; then
    echo "$KEEPSTATE_ANSIBLE_VENV exists and is not a venv; not touching it" >&2
    exit 1
  fi
  /usr/bin/python3 -m venv --clear "$KEEPSTATE_ANSIBLE_VENV"
  "$KEEPSTATE_ANSIBLE_VENV/bin/pip" install -q --disable-pip-version-check -r "$ansible_reqs"
  cp "$ansible_reqs" "$KEEPSTATE_ANSIBLE_VENV/.keepstate-requirements"
fi
# promtool (tests/tests/alerts.rs: the alert rules' unit tests, `check metrics` on a live scrape)
# from Debian's prometheus package, unpacked under target/ rather than installed: installing the
# package would start a Prometheus server on this machine and enable it at boot. Nothing of it
# runs here but promtool.
prom_dir="$PWD/target/prometheus"
if [ ! -x "$prom_dir/usr/bin/promtool" ]; then
  echo "== unpacking promtool from Debian's prometheus package into $prom_dir"
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && apt-get download prometheus 2>/dev/null) \
    || { apt-get update -qq && (cd "$deb_dir" && apt-get download prometheus); }
  mkdir -p "$prom_dir"
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$prom_dir"
  rm -rf "$deb_dir"
fi
export KEEPSTATE_PROMTOOL="$prom_dir/usr/bin/promtool"
"$KEEPSTATE_PROMTOOL" --version >/dev/null
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== fuzz targets build (running them is documented in node/fuzz/README.md)"
cargo build --release --locked --manifest-path node/fuzz/Cargo.toml
# Before the test build below: both write target/release/fwnode and fwctl, and the package
# must hold the release build, without the test-only fault-injection hook.
echo "== the Debian package (deploy/debian/build-deb.sh; tests/tests/package.rs installs it)"
KEEPSTATE_DEB=$(bash deploy/debian/build-deb.sh | tail -n 1)
export KEEPSTATE_DEB
echo "== building release binaries for the end-to-end tests"
# fault-injection: the test-only hook that lets a test kill a datapath worker (off by default).
cargo build --release --locked -p fwnode -p fwctl -p keepstate-tests --bins --features fwnode/fault-injection
echo "== the previous release's fwnode and fwctl (tests/PREVIOUS_RELEASE) for the upgrade tests"
KEEPSTATE_PREVIOUS_DIR=$(bash tests/build-previous.sh)
export KEEPSTATE_PREVIOUS_DIR
echo "== cargo test"
export KEEPSTATE_BIN_DIR="$PWD/target/release"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast -- --test-threads="${KEEPSTATE_TEST_THREADS:-2}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line with the totals over every test binary (cargo's own last line is the
# doc-tests' "0 passed").
count() { grep -Eo "[0-9]+ $1" "$log" | awk '{ s += $1 } END { print s + 0 }'; }
echo "summary: $(count passed) passed, $(count failed) failed"
exit "$rc"
