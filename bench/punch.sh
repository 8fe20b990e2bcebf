#!/usr/bin/env bash
# NAT traversal benchmark (needs root: network namespaces, nftables NAT routers, coturn).
#
# Per NAT pairing {public, port-restricted cone, full cone, symmetric}²: time from starting
# `qssh connect PEERID --relay` to the first chat message at the listener, and to the direct
# path. Then `exec cat` of QSSH_BENCH_BYTES (default 1 GiB) over the direct QUIC/UDP path
# and over TCP in the same lab and run.
#
#   bash bench/punch.sh                     # 1 GiB per transport
#   QSSH_BENCH_BYTES=268435456 bash bench/punch.sh
#
# Builds in release (once) and prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ci-deps.sh >/dev/null
echo "load: $(cat /proc/loadavg)"
exec cargo test --release --test nat_lab bench_punch -- --ignored --nocapture --test-threads=1
