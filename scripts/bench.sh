#!/usr/bin/env bash
# Builds the Rust benchmark in release mode and runs scripts/bench.py with the provisioned
# Python (Lightning installed). Prints markdown tables; about 70 minutes on 2 cores with the
# default 15 rounds (`--repeats 5`: about 20 minutes, wider intervals).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/provision.sh
cargo build --release -p tch-fabric-cli --example bench
exec .venv/bin/python scripts/bench.py "$@"
