#!/usr/bin/env bash
# Builds telltale (release) and runs `telltale demo`: an in-process broker, generated traffic,
# the real pipeline, Parquet under ./telltale-data, and example SQL.
# Usage: scripts/demo.sh [demo arguments, e.g. --records 50000]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --release --quiet -- demo "$@"
