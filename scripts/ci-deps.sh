#!/usr/bin/env bash
# Installs what the test suites need that a fresh Debian machine may lack, and nothing that
# is already there (safe to run again and again). One Debian package per line, with the test
# that needs it. Needs root (or sudo) only when something is missing.
set -euo pipefail

PACKAGES=(
  iproute2  # tests/netns: `ip netns`, veth, bridges
  procps    # tests/netns: sysctl, kill, ps
  python3   # tests/netns: the independent mDNS browser (python-zeroconf)
  tmux      # tests/shell_tmux.rs: drives an interactive `qssh shell` in a real terminal
  vim-tiny  # tests/shell_tmux.rs: a full-screen program (vi) inside the remote shell
  less      # tests/shell_tmux.rs: a pager inside the remote shell
  iperf3    # tests/vpn_netns.rs: TCP and UDP throughput through the tunnel
  iputils-ping  # tests/vpn_netns.rs: ping both ways over IPv4 and IPv6
  util-linux    # tests/vpn_netns.rs: setpriv (a run without CAP_NET_ADMIN)
  nftables  # tests/nat_lab.rs: NAT routers
  conntrack # tests/nat_lab.rs: flushing NAT mappings
  coturn    # tests/nat_lab.rs: STUN server and turnutils_natdiscovery
  tcpdump   # tests/nat_lab.rs: capture on the relay (no plaintext)
)

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
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
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

echo "ci-deps: ok ($(ip -V 2>&1 | head -n1); python zeroconf $(python3 -c 'import zeroconf; print(zeroconf.__version__)'))"
