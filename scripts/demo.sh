#!/usr/bin/env bash
# Builds telltale and runs `telltale demo`: an in-process broker, generated traffic, the real
# pipeline, Parquet under ./telltale-data, and example SQL. The dev profile (optimised at
# opt-level 1, see Cargo.toml) is the one scripts/test.sh builds too, so on a fresh machine the
# two commands share one build; `cargo install --path .` builds the release binary.
# Usage: scripts/demo.sh [demo arguments, e.g. --records 50000]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --quiet -- demo "$@"
