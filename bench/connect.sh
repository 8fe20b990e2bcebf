#!/usr/bin/env bash
# Connect latency on loopback: qssh against OpenSSH, median of N runs each (default 20).
#
# qssh: wall time from starting `qssh connect PEERID@127.0.0.1:PORT` (pinned peer, stdin one
#   line) until the listener prints that line on its stdout, i.e. process start, identity
#   load, TCP connect, the hybrid handshake, the chat channel's open round trip and the first
#   message, as the receiving peer sees it. One listener serves every run.
# ssh: wall time of `ssh -o KexAlgorithms=sntrup761x25519-sha512@openssh.com USER@127.0.0.1
#   true` (pinned host key, Ed25519 user key, no config file, no connection sharing) against
#   a throwaway sshd: process start, TCP connect, key exchange, authentication, a session
#   channel, the user's shell running `true` (sshd runs `$SHELL -c true`, so a slow shell
#   startup file counts) and the exit status.
# ssh -s sftp: the same connection, but the channel starts sshd's in-process internal-sftp
#   subsystem (no shell, no exec) and ends at stdin EOF: the protocol cost alone, the closest
#   OpenSSH counterpart of what the qssh number measures.
#
# The sshd is this script's own: it installs openssh-server if missing (root, apt-get), and
# runs `sshd -f CONFIG -D -e` with host key, authorized_keys and config in a temporary
# directory, on 127.0.0.1 only. Nothing under /etc/ssh is read or changed and the system's
# sshd is never started or stopped (only /run/sshd, sshd's privilege-separation directory,
# is created if missing). Everything the script started is killed on exit.
#
# Environment: QSSH_BENCH_RUNS=N (runs per tool, default 20), QSSH_BENCH_NO_SSH=1 (qssh only).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${QSSH_BENCH_RUNS:-20}

work=$(mktemp -d /tmp/qssh-connect-bench.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
  echo "connect bench: $*" >&2
  exit 1
}

# Microseconds since the epoch (bash 5's EPOCHREALTIME, without the dot).
now_us() {
  local t=$EPOCHREALTIME
  echo "${t/[.,]/}"
}

# "median min max" in milliseconds of the microsecond values given.
stats_ms() {
  printf '%s\n' "$@" | sort -n | awk '
    { v[NR] = $1 }
    END {
      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "%.2f %.2f %.2f\n", m / 1000, v[1] / 1000, v[NR] / 1000
    }'
}

# A TCP port on 127.0.0.1 that nothing listens on (bounded tries).
free_port() {
  local i p
  for i in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 9<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

echo "building qssh (release)"
cargo build --release --locked --bin qssh
qssh=${CARGO_TARGET_DIR:-$PWD/target}/release/qssh
[ -x "$qssh" ] || die "no binary at $qssh"

# ---- qssh -------------------------------------------------------------------------------
mkdir -m 700 "$work/listener" "$work/connector"
QSSH_HOME=$work/connector "$qssh" keygen >/dev/null 2>&1
mkfifo "$work/listen.out"
QSSH_HOME=$work/listener "$qssh" listen --bind 127.0.0.1 --port 0 --name bench-listener \
  </dev/null >"$work/listen.out" 2>"$work/listen.err" &
pids+=($!)
exec 3<"$work/listen.out"

# "listening on 127.0.0.1:PORT as PEERID (NAME)"
addr='' peer=''
for _ in $(seq 1 100); do
  if read -r _ _ addr _ peer _ < <(grep -m1 '^listening on ' "$work/listen.err" 2>/dev/null); then
    break
  fi
  sleep 0.05
done
[ -n "$peer" ] || die "listener did not start: $(cat "$work/listen.err")"
echo "qssh listener on $addr, peer ID $peer"

# One run: sets `elapsed` to the microseconds from starting the connector to the listener
# printing the message.
elapsed=0
qssh_once() {
  local msg="bench message $1 $RANDOM" line t0 t1 cpid
  t0=$(now_us)
  QSSH_HOME=$work/connector "$qssh" connect --name bench "$peer@$addr" \
    <<<"$msg" >/dev/null 2>>"$work/connect.err" &
  cpid=$!
  while true; do
    IFS= read -r -t 10 line <&3 || die "no message at the listener after 10 s: $(tail -n 5 "$work/connect.err")"
    [[ $line == *": $msg" ]] && break
  done
  t1=$(now_us)
  wait "$cpid" || die "qssh connect failed: $(tail -n 5 "$work/connect.err")"
  elapsed=$((t1 - t0))
}

# ---- OpenSSH ----------------------------------------------------------------------------
ssh_line="skipped (QSSH_BENCH_NO_SSH=1)"
sftp_line=$ssh_line
ratio_line=""
if [ "${QSSH_BENCH_NO_SSH:-0}" != 1 ]; then
  if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
    [ "$(id -u)" = 0 ] || die "openssh-server is missing and installing it needs root"
    echo "installing openssh-server and openssh-client"
    if ! apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null 2>&1; then
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
    fi
  fi
  [ -d /run/sshd ] || mkdir -m 755 /run/sshd
  ssh_port=$(free_port)
  user=$(id -un)
  ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$work/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C bench-user -f "$work/user_ed25519"
  cp "$work/user_ed25519.pub" "$work/authorized_keys"
  echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1,2 "$work/host_ed25519.pub")" >"$work/known_hosts"
  cat >"$work/sshd_config" <<EOF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $work/host_ed25519
PidFile $work/sshd.pid
AuthorizedKeysFile $work/authorized_keys
AllowUsers $user
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
KexAlgorithms sntrup761x25519-sha512@openssh.com
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
  /usr/sbin/sshd -t -f "$work/sshd_config" || die "sshd rejects the generated configuration"
  /usr/sbin/sshd -f "$work/sshd_config" -D -e 2>"$work/sshd.log" &
  pids+=($!)
  ssh_opts=(-F /dev/null -p "$ssh_port" -i "$work/user_ed25519" -o IdentitiesOnly=yes
    -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$work/known_hosts"
    -o ControlMaster=no -o ControlPath=none
    -o KexAlgorithms=sntrup761x25519-sha512@openssh.com)
  ssh_true=(ssh "${ssh_opts[@]}" "$user@127.0.0.1" true)
  ssh_sftp=(ssh "${ssh_opts[@]}" -s "$user@127.0.0.1" sftp)
  up=0
  for _ in $(seq 1 100); do
    if "${ssh_true[@]}" 2>/dev/null; then
      up=1
      break
    fi
    sleep 0.05
  done
  [ "$up" = 1 ] || die "ssh to the throwaway sshd fails: $("${ssh_true[@]}" 2>&1 | tail -n 3; tail -n 5 "$work/sshd.log")"
  kex=$(ssh -v "${ssh_opts[@]}" "$user@127.0.0.1" true 2>&1 | grep -m1 'kex: algorithm:' || true)
  echo "throwaway sshd on 127.0.0.1:$ssh_port (${kex#debug1: }), user $user, shell $(getent passwd "$user" | cut -d: -f7)"
  "${ssh_sftp[@]}" </dev/null || die "ssh -s sftp fails"
fi

# ---- measurements, interleaved so that both tools see the same machine load -------------
with_ssh=0
[ "${QSSH_BENCH_NO_SSH:-0}" = 1 ] || with_ssh=1
qssh_once warmup
qssh_times=() ssh_times=() sftp_times=()
for i in $(seq 1 "$runs"); do
  qssh_once "$i"
  qssh_times+=("$elapsed")
  if [ "$with_ssh" = 1 ]; then
    t0=$(now_us)
    "${ssh_true[@]}" || die "ssh run $i failed"
    t1=$(now_us)
    ssh_times+=($((t1 - t0)))
    t0=$(now_us)
    "${ssh_sftp[@]}" </dev/null || die "ssh -s sftp run $i failed"
    t1=$(now_us)
    sftp_times+=($((t1 - t0)))
  else
    # The listener admits 5 handshakes per second per address (burst 20): stay under it.
    sleep 0.25
  fi
done
read -r q_med q_min q_max < <(stats_ms "${qssh_times[@]}")
if [ "$with_ssh" = 1 ]; then
  read -r s_med s_min s_max < <(stats_ms "${ssh_times[@]}")
  read -r f_med f_min f_max < <(stats_ms "${sftp_times[@]}")
  ssh_line="$s_med ms (min $s_min, max $s_max)"
  sftp_line="$f_med ms (min $f_min, max $f_max)"
  ratio_line=$(awk -v q="$q_med" -v s="$s_med" -v f="$f_med" 'BEGIN {
    printf "ratio qssh/ssh (medians): %.3f against ssh true, %.3f against ssh -s sftp (goal <= 0.1)", q / s, q / f }')
fi

echo
echo "connect latency on loopback, median of $runs runs each, interleaved ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo "  qssh connect -> first chat message at the listener:  $q_med ms (min $q_min, max $q_max)"
echo "  ssh (sntrup761x25519) host true:                     $ssh_line"
echo "  ssh (sntrup761x25519) -s host sftp, no shell:        $sftp_line"
[ -z "$ratio_line" ] || echo "  $ratio_line"
