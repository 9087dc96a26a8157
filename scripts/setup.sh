#!/usr/bin/env bash
# Installs what building and testing telltale needs, then says what it found.
# Safe to run repeatedly; it only installs what is missing.
#   - a C toolchain (gcc, make) and zlib headers: librdkafka is built from source by rdkafka-sys
#   - cargo-nextest: the test runner scripts/test.sh uses
# Nothing else is needed: the tests' Kafka-protocol broker is librdkafka's mock cluster, which
# ships inside the rdkafka crate.
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo not found: install Rust 1.94 or newer (https://rustup.rs), then run this again"
  exit 1
fi

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v perl >/dev/null 2>&1 || missing+=(perl)
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "please install: ${missing[*]} (needed to build librdkafka)"
    exit 1
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

say "ready: $(cargo --version), $(cargo nextest --version | head -n1)"
