#!/usr/bin/env bash
# Installs the tools the tests need, and nothing already there (safe to run again and again).
# One line per tool: "COMMAND DEBIAN-PACKAGE". Other engineers add lines here.
set -euo pipefail

TOOLS='
ip          iproute2
sysctl      procps
nft         nftables
conntrack   conntrack
turnserver  coturn
tcpdump     tcpdump
'

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "ci-deps: need root to run: $*" >&2; return 1
  fi
}

missing=()
while read -r cmd pkg; do
  [ -n "${cmd:-}" ] || continue
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done <<< "$TOOLS"

if [ "${#missing[@]}" -gt 0 ]; then
  echo "ci-deps: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "ci-deps: all test tools present"
