#!/usr/bin/env bash
# Bulk throughput on loopback: `qssh connect ... -- cat` over QUIC/UDP (`--udp`) and over TCP,
# against one `qssh listen --bind 127.0.0.1`, interleaved so both see the same load.
#
#   bash bench/bulk.sh                       # 1 GiB, 3 runs per transport
#   QSSH_BENCH_BYTES=268435456 QSSH_BENCH_RUNS=5 bash bench/bulk.sh
#   QSSH_BIN=/path/to/qssh bash bench/bulk.sh   # skip the build
#
# Prints every run (wall time, MiB/s, and the CPU seconds both qssh processes used: less
# sensitive to other load on the machine than the wall time) and the median MiB/s per
# transport. No root needed.
set -euo pipefail
cd "$(dirname "$0")/.."
BYTES=${QSSH_BENCH_BYTES:-1073741824}
RUNS=${QSSH_BENCH_RUNS:-3}
if [ -z "${QSSH_BIN:-}" ]; then
    cargo build --release --locked --bin qssh >&2
    QSSH_BIN="${CARGO_TARGET_DIR:-target}/release/qssh"
fi
tmp=$(mktemp -d)
lis_pid=""
cleanup() {
    if [ -n "$lis_pid" ]; then kill "$lis_pid" 2>/dev/null || true; wait "$lis_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
mkdir -p "$tmp/lis" "$tmp/con"
lid=$(QSSH_HOME="$tmp/lis" "$QSSH_BIN" id | head -n1)
cid=$(QSSH_HOME="$tmp/con" "$QSSH_BIN" id | head -n1)
QSSH_HOME="$tmp/lis" "$QSSH_BIN" listen --bind 127.0.0.1 --port 0 --allow "$cid" \
    </dev/null >"$tmp/lis.out" 2>"$tmp/lis.err" &
lis_pid=$!
port=""
for _ in $(seq 100); do
    port=$(sed -n 's/^listening on [^ ]*:\([0-9]*\).*/\1/p' "$tmp/lis.err" | head -n1)
    if [ -n "$port" ] && grep -q "^UDP (QUIC) on port" "$tmp/lis.err"; then break; fi
    sleep 0.1
done
[ -n "$port" ] || { echo "listener did not start:"; cat "$tmp/lis.err"; exit 1; } >&2
echo "load before: $(cat /proc/loadavg)"
# utime + stime of the listener process (not its `cat`), in clock ticks.
lis_ticks() { awk '{print $14 + $15}' "/proc/$lis_pid/stat"; }
hz=$(getconf CLK_TCK)
echo "| run | transport | time (s) | MiB/s | CPU s listener | CPU s connector |"
echo "|---|---|---|---|---|---|"
declare -A results
for run in $(seq "$RUNS"); do
    for t in udp tcp; do
        flag=""
        [ "$t" = udp ] && flag="--udp"
        l0=$(lis_ticks)
        t0=$(date +%s.%N)
        got=$(head -c "$BYTES" /dev/zero | QSSH_HOME="$tmp/con" /usr/bin/time -f "%U %S" \
            -o "$tmp/con.time" "$QSSH_BIN" connect "$lid@127.0.0.1:$port" $flag -- cat \
            2>"$tmp/con.err" | wc -c)
        t1=$(date +%s.%N)
        l1=$(lis_ticks)
        if [ "$got" != "$BYTES" ]; then
            echo "$t run $run: got $got of $BYTES bytes" >&2
            cat "$tmp/con.err" >&2
            exit 1
        fi
        mibs=$(echo "$BYTES $t0 $t1" | awk '{printf "%.1f", $1 / 1048576 / ($3 - $2)}')
        secs=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
        lcpu=$(echo "$l0 $l1 $hz" | awk '{printf "%.2f", ($2 - $1) / $3}')
        ccpu=$(tail -n1 "$tmp/con.time" | awk '{printf "%.2f", $1 + $2}')
        echo "| $run | $t | $secs | $mibs | $lcpu | $ccpu |"
        results[$t]="${results[$t]:-} $mibs"
    done
done
echo "load after: $(cat /proc/loadavg)"
for t in udp tcp; do
    med=$(echo "${results[$t]}" | tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    echo "median $t: $med MiB/s"
done
