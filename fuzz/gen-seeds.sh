#!/usr/bin/env bash
# Regenerates the committed seed corpora under fuzz/seeds/ from the seed functions in
# fuzz/src/ (deterministic: same bytes on every machine). Run it after a change to the wire
# format, the handshake or the fixture makes `committed_seed_corpora_are_current` fail.
set -euo pipefail
cd "$(dirname "$0")/.."
QSSH_FUZZ_WRITE_SEEDS=1 cargo test --locked --test fuzz_smoke committed_seed_corpora_are_current -- --nocapture
git status --short fuzz/seeds
