#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit/property/integration tests
# (in-memory sessions, real processes over loopback, network-namespace labs), and a short
# fuzz smoke run. Installs what the tests need first (Debian packages, Python modules).
#
# Namespace tests need root. Without it they skip loudly; with QSSH_REQUIRE_NETNS=1 (CI sets
# it) a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${CI:-}" = "true" ]; then
  export QSSH_REQUIRE_NETNS=1
fi

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
bash scripts/ci-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test (unit, property, loopback, namespaces)"
cargo test --locked --lib --bins --tests --examples -- --test-threads=2

step "benchmarks, once each in test mode"
cargo test --locked --bench core --bench datagram

step "fuzz smoke run"
bash fuzz/smoke.sh

step "all tests passed"
