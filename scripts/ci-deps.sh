#!/usr/bin/env bash
# Installs what the test suites need that a fresh Debian machine may lack, and nothing that
# is already there (safe to run again and again):
#   - iproute2 (`ip`) and procps (`sysctl`, `kill`): network-namespace labs (tests/netns/).
#   - nftables, conntrack, coturn, tcpdump: NAT traversal labs (tests/nat_lab.rs).
#   - python3 + python-zeroconf: an independent mDNS/DNS-SD browser that checks what qssh
#     registers (tests/netns/zeroconf_browse.py).
# Needs root (or sudo) only when something is missing.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "ci-deps: need root to run: $*" >&2; return 1
  fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
{ command -v sysctl >/dev/null 2>&1 && command -v kill >/dev/null 2>&1; } || missing+=(procps)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-pip)
# NAT traversal labs (tests/nat_lab.rs): NAT routers, conntrack flushes, coturn as the STUN
# server (and turnutils_natdiscovery), packet capture on the relay.
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
command -v turnserver >/dev/null 2>&1 || missing+=(coturn)
command -v tcpdump >/dev/null 2>&1 || missing+=(tcpdump)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "ci-deps: installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

if ! python3 -c 'import zeroconf' >/dev/null 2>&1; then
  echo "ci-deps: installing python zeroconf"
  # PyPI first (a pyenv or venv python); a Debian-managed python refuses plain pip
  # (PEP 668): then Debian's own package.
  python3 -m pip install --quiet --disable-pip-version-check 'zeroconf>=0.131,<1' 2>/dev/null \
    || apt_install python3-zeroconf
fi

echo "ci-deps: $(ip -V 2>&1 | head -n1); python zeroconf $(python3 -c 'import zeroconf; print(zeroconf.__version__)')"
