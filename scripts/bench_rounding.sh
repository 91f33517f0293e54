#!/usr/bin/env bash
# Builds the demo in release mode and runs scripts/bench_rounding.py with the provisioned Python
# (torchao installed by provision.sh): bf16-true with stochastic rounding and with Kahan
# summation against 32-true and plain bf16-true, and torchao's stochastic-rounding AdamW on the
# same model and data. Prints markdown tables. Arguments go to the Python script (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/provision.sh
cargo build --release -p tch-fabric-cli --bin demo
exec .venv/bin/python scripts/bench_rounding.py "$@"
