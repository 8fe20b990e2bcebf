#!/usr/bin/env bash
# LAN discovery benchmark: on a network-namespace LAN of N hosts (default: 2, then 8), every
# host runs a listener's announcer, then every host runs `discover` at once; reported is the
# time each discover needed until it listed all N-1 others (median and max over the hosts),
# per mechanism: broadcast only, mDNS only, both. Goal: all peers within 1 s.
#
#   sudo bench/discover.sh            # 2 and 8 hosts
#   sudo bench/discover.sh "2 4 8 16" # other sizes (at most 32)
#
# Needs root and scripts/ci-deps.sh's packages. Reuses the integration test's lab harness
# (tests/netns/) and examples/disc_probe through an ignored test, so cleanup is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-2 8}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if QSSH_REQUIRE_NETNS=1 QSSH_BENCH_HOSTS="$hosts" \
  cargo test --quiet --test discovery_netns bench_time_to_all_peers -- \
    --ignored --nocapture --test-threads=1 >"$log" 2>&1; then
  grep '^bench:' "$log" | sed 's/^bench: //'
else
  tail -n 60 "$log" >&2
  echo "bench/discover.sh: benchmark failed" >&2
  exit 1
fi
