#!/usr/bin/env bash
# Short fuzz smoke run, part of scripts/test.sh. Exits non-zero if any target panics.
#
# 1. Always: the targets' bodies (fuzz/src/) over their seed corpora and thousands of seeded
#    random and mutated inputs, as a normal cargo test on the stable toolchain
#    (tests/fuzz_smoke.rs; reuses the build of the preceding `cargo test`).
# 2. When cargo-fuzz is installed: libFuzzer itself on each target for a few seconds
#    (coverage-guided, starting from fuzz/seeds/, growing fuzz/corpus/), built with the stable
#    toolchain and `--sanitizer none` in fuzz/target. The first build takes minutes; later
#    ones are incremental.
#
# Environment:
#   QSSH_FUZZ_ITERS=N            inputs per target in step 1 (default 4000)
#   QSSH_FUZZ_SECONDS=N          libFuzzer seconds per target in step 2 (default 8)
#   QSSH_FUZZ_SANITIZER=address  step 2 with AddressSanitizer (needs nightly features: uses
#                                RUSTC_BOOTSTRAP=1 on stable; builds in fuzz/target-asan)
#   QSSH_FUZZ_INSTALL=1          install cargo-fuzz first if it is missing (about 2 minutes)
#   QSSH_REQUIRE_LIBFUZZER=1     fail instead of skipping step 2 when it cannot run
# Longer runs: see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
targets=(frame_decode handshake_responder session_input)
iters=${QSSH_FUZZ_ITERS:-4000}
seconds=${QSSH_FUZZ_SECONDS:-8}
sanitizer=${QSSH_FUZZ_SANITIZER:-none}
started=$SECONDS

skip_libfuzzer() {
  echo "fuzz smoke: libFuzzer step skipped: $*"
  if [ "${QSSH_REQUIRE_LIBFUZZER:-0}" = 1 ]; then
    echo "fuzz smoke: FAILED (QSSH_REQUIRE_LIBFUZZER=1)" >&2
    exit 1
  fi
  echo "fuzz smoke: passed (seeded harness only) in $((SECONDS - started)) s"
  exit 0
}

echo "fuzz smoke 1/2: seeded harness, ${iters} inputs per target (tests/fuzz_smoke.rs)"
if ! QSSH_FUZZ_ITERS=$iters cargo test --locked --test fuzz_smoke -- --test-threads=2 --nocapture; then
  echo "fuzz smoke: FAILED: a target panicked or a seed check failed (inputs saved under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz smoke 1/2: done after $((SECONDS - started)) s"

if ! cargo fuzz --version >/dev/null 2>&1; then
  if [ "${QSSH_FUZZ_INSTALL:-0}" = 1 ]; then
    echo "fuzz smoke: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
  else
    skip_libfuzzer "cargo-fuzz is not installed (cargo install --locked cargo-fuzz, or QSSH_FUZZ_INSTALL=1)"
  fi
fi

# The fuzz crate is its own workspace with its own target directory: never the main one,
# whose release and test artifacts it would otherwise invalidate.
unset CARGO_TARGET_DIR
fuzz_env=()
target_dir=$root/fuzz/target
if [ "$sanitizer" != none ]; then
  fuzz_env=(RUSTC_BOOTSTRAP=1)
  target_dir=$root/fuzz/target-asan
fi
log_dir=$root/fuzz/artifacts
mkdir -p "$log_dir"

echo "fuzz smoke 2/2: libFuzzer, ${seconds} s per target, sanitizer ${sanitizer} ($(cargo fuzz --version), $(rustc --version))"
build_log=$log_dir/build.log
if ! (cd fuzz && env "${fuzz_env[@]}" CARGO_TARGET_DIR="$target_dir" cargo fuzz build -s "$sanitizer" >"$build_log" 2>&1); then
  tail -n 30 "$build_log"
  skip_libfuzzer "the fuzz targets do not build with cargo-fuzz on this toolchain (log: $build_log)"
fi

for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log=$log_dir/$t.log
  # Corpus: fuzz/corpus/T (written) and fuzz/seeds/T (committed, read only).
  if (cd fuzz && env "${fuzz_env[@]}" CARGO_TARGET_DIR="$target_dir" cargo fuzz run -s "$sanitizer" "$t" \
    "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1); then
    runs=$(awk '/^stat::number_of_executed_units/ { print $2 }' "$log")
    cov=$(awk '/DONE/ && match($0, /cov: [0-9]+/) { c = substr($0, RSTART, RLENGTH) } END { print c }' "$log")
    echo "fuzz smoke: $t: ${runs:-?} executions in ${seconds} s, ${cov:-cov: ?}, no crash"
  else
    tail -n 40 "$log"
    echo "fuzz smoke: FAILED: libFuzzer found a crash in $t; reproducer under fuzz/artifacts/$t/ (full log: $log)" >&2
    echo "  reproduce: cd fuzz && cargo fuzz run -s $sanitizer $t artifacts/$t/<file>" >&2
    exit 1
  fi
done
echo "fuzz smoke: passed (seeded harness and libFuzzer) in $((SECONDS - started)) s"
