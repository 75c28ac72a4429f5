#!/usr/bin/env bash
# The keepstate lab demo. For now: build and show fwnode's help.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p fwnode -p fwctl
./target/release/fwnode --help
