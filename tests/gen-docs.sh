#!/usr/bin/env bash
# Regenerate what README.md holds from the code: the fwctl reference between its markers, from
# fwctl's own --help (tests/tests/docs.rs writes it with KEEPSTATE_UPDATE_DOCS=1, then checks it
# like any run), and the pictures under docs/ from their data in docs/data/.
# Usage: bash tests/gen-docs.sh   (uses $KEEPSTATE_BIN_DIR/fwctl, else target/release or debug)
set -euo pipefail
cd "$(dirname "$0")/.."
KEEPSTATE_UPDATE_DOCS=1 cargo test -q -p keepstate-tests --test docs the_fwctl_reference_is_fwctl_help
python3 tests/plot.py ratios docs/data/datapath.json docs/datapath-ratios.svg
python3 tests/plot.py failover docs/data/failover-a.json docs/failover-a.svg
python3 tests/plot.py failover docs/data/failover-a-0-02-s-adverts.json docs/failover-a-20ms-adverts.svg
cargo test -q -p keepstate-tests --test docs
