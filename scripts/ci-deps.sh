#!/usr/bin/env bash
# Installs the Debian packages the tests need. Idempotent: installs only what is missing.
# One package per line; add yours with a comment naming the test that needs it.
set -euo pipefail

PACKAGES=(
  tmux      # tests/shell_tmux.rs: drives an interactive `qssh shell` in a real terminal
  vim-tiny  # tests/shell_tmux.rs: a full-screen program (vi) inside the remote shell
  less      # tests/shell_tmux.rs: a pager inside the remote shell
  procps    # tests: ps for process checks
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
