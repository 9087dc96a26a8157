#!/usr/bin/env bash
# Runs every test: unit tests, the integration tests against a real Kafka-protocol broker
# (started in-process by the tests on 127.0.0.1), and the CLI tests.
# Usage: scripts/test.sh [extra nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo nextest run --workspace --no-fail-fast "$@"
