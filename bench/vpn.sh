#!/usr/bin/env bash
# VPN benchmark: the same two-namespace topology (two hosts joined by a veth pair) three
# times, with the qssh VPN, boringtun (user-space WireGuard, `--threads 1`, configured with
# `wg`) and `ssh -w`. For each it prints iperf3 TCP throughput through the tunnel (median of
# REPS runs of DURATION seconds), ping RTT through the tunnel (average of 20), and the time
# from starting the dialing side's process to the first ping reply through the tunnel, with
# ratios to boringtun measured in the same run. Only ratios within one run mean anything.
#
# Needs root, iproute2, iperf3, ping, python3, wireguard-tools (`wg`), openssh client and
# server, and boringtun-cli (`cargo install boringtun-cli`; installed here if missing).
# Environment: QSSH (binary, default target/release/qssh, built if missing), REPS (3),
# DURATION (5), ONLY (qssh|boringtun|ssh|interleaved to run one), QSSH_ARGS (extra qssh
# VPN flags, both sides, e.g. "--no-udp" for the TCP link or "--no-offload"), FR_REPS (1: qssh's first-reply
# time is measured this many times, a fresh connector each time, and the median is shown
# with min and max), IL_PINGS (400: pings per tunnel in the interleaved RTT run, both
# tunnels up at once; 0 to skip), IL_SWAP (1: ping boringtun's series first), IL_PIN (1:
# the interleaved run with everything in A on CPU 1 and everything in B on CPU 0, like two
# hosts), QSSH_BASE (another qssh binary, e.g. a build of the previous
# commit: the interleaved run then brings it up too, as a third tunnel, and prints the ratio;
# QSSH_BASE_ARGS, its flags, default QSSH_ARGS), STAGES (1: during the interleaved run,
# record kernel tracepoints with perf for 8 s and print each stage of a ping's round trip
# through qssh and boringtun, bench/vpn_stages.py). With STAGES: EXTRA_EV (more perf
# events for that recording, with a leading comma, e.g.
# ",raw_syscalls:sys_enter,raw_syscalls:sys_exit" to see each packet-thread turn's system
# calls) and STAGES_KEEP (a file to keep the `perf script` text in, for a closer look).
#
# First-reply time: bench/first_reply.py, already running in the dialing namespace, starts
# the dialing side (for boringtun and ssh -w, the commands that configure the interface,
# which their users must run too) and sends an ICMP echo every millisecond from a raw socket
# until one is answered: ~1 ms resolution.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DURATION=${DURATION:-5}
ONLY=${ONLY:-}
QSSH=${QSSH:-target/release/qssh}
QSSH_ARGS=${QSSH_ARGS:-}
FR_REPS=${FR_REPS:-1}
IL_PINGS=${IL_PINGS:-400}
QSSH_BASE=${QSSH_BASE:-}
QSSH_BASE_ARGS=${QSSH_BASE_ARGS-$QSSH_ARGS}
STAGES=${STAGES:-}

[ "$(id -u)" -eq 0 ] || { echo "vpn.sh: needs root (network namespaces)" >&2; exit 1; }
for t in ip iperf3 ping python3; do
  command -v "$t" >/dev/null || { echo "vpn.sh: $t missing (bash scripts/ci-deps.sh)" >&2; exit 1; }
done
if [ -z "$ONLY" ] || [ "$ONLY" = boringtun ] || [ "$ONLY" = interleaved ]; then
  command -v wg >/dev/null || apt-get install -y -qq --no-install-recommends wireguard-tools >/dev/null
  command -v boringtun-cli >/dev/null || [ -x "$HOME/.cargo/bin/boringtun-cli" ] \
    || cargo install --locked boringtun-cli
  BORINGTUN=$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")
fi
if [ -n "$STAGES" ]; then
  command -v perf >/dev/null || apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
fi
if [ -z "$ONLY" ] || [ "$ONLY" = ssh ]; then
  command -v sshd >/dev/null || apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
fi
if [ -z "$ONLY" ] || [ "$ONLY" = qssh ] || [ "$ONLY" = interleaved ]; then
  [ -x "$QSSH" ] || cargo build --release --locked
fi

ID=$$
A=qvb$ID-a
B=qvb$ID-b
TMP=$(mktemp -d /tmp/qssh-vpn-bench.XXXXXX)
UNDER_A=10.77.0.1
UNDER_B=10.77.0.2

ns_clean() {
  for ns in "$A" "$B"; do
    if ip netns list | grep -qw "$ns"; then
      for p in $(ip netns pids "$ns" 2>/dev/null | head -n 1000); do kill -KILL "$p" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
}
cleanup() { ns_clean; rm -rf "$TMP"; }
trap cleanup EXIT INT TERM

topology() {
  ns_clean
  ip netns add "$A"; ip netns add "$B"
  ip link add eth0 netns "$A" type veth peer name eth0 netns "$B"
  ip -n "$A" addr add $UNDER_A/24 dev eth0
  ip -n "$B" addr add $UNDER_B/24 dev eth0
  for ns in "$A" "$B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
}

# first_reply DST LOG CMD...: runs CMD in B and prints ms from its start to the first reply.
first_reply() {
  local dst=$1 log=$2
  shift 2
  ip netns exec "$B" python3 bench/first_reply.py "$dst" 10 "$log" -- "$@"
}

rtt() {
  ip netns exec "$B" ping -n -q -c 20 -i 0.05 "$1" | awk -F/ '/^rtt/ {print $5}'
}

throughput() {
  local dst=$1 runs=() r
  for r in $(seq 1 "$REPS"); do
    ip netns exec "$A" iperf3 -s -1 -B "$dst" >/dev/null 2>&1 &
    sleep 0.3
    runs+=("$(ip netns exec "$B" iperf3 -c "$dst" -t "$DURATION" -J 2>/dev/null \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)' \
      || echo 0)")
    wait || true
  done
  printf '%s\n' "${runs[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'
}

declare -A TP RT FR IL

# qssh_listener: qssh's listening side in A (VPN 10.200.0.1), once "listening on" shows.
qssh_listener() {
  local idb
  idb=$("$QSSH" --home "$TMP/qb" id 2>/dev/null | head -n1)
  "$QSSH" --home "$TMP/qa" id >/dev/null 2>&1
  # shellcheck disable=SC2086
  ip netns exec "$A" "$QSSH" --home "$TMP/qa" listen --bind $UNDER_A --vpn 10.200.0.1/24 --allow "$idb" $QSSH_ARGS \
    </dev/null >"$TMP/qa.out" 2>"$TMP/qa.err" &
  for _ in $(seq 1 200); do grep -q "listening on" "$TMP/qa.err" 2>/dev/null && break; sleep 0.02; done
}
# The dialing side's command line.
# shellcheck disable=SC2206
QSSH_DIAL=("$QSSH" --home "$TMP/qb" connect $UNDER_A --accept-new --vpn 10.200.0.2/24 $QSSH_ARGS)

bench_qssh() {
  topology
  qssh_listener
  local frs=() r
  for r in $(seq 1 "$FR_REPS"); do
    if [ "$r" -gt 1 ]; then
      # A fresh connector each time: stop the previous one, wait for its interface to go.
      for p in $(ip netns pids "$B" 2>/dev/null | head -n 100); do kill -TERM "$p" 2>/dev/null || true; done
      for _ in $(seq 1 200); do ip -n "$B" -o link show type tun | grep -q . || break; sleep 0.01; done
      sleep 0.2
    fi
    frs+=("$(first_reply 10.200.0.1 "$TMP/qb.err" "${QSSH_DIAL[@]}")")
  done
  FR[qssh]=$(printf '%s\n' "${frs[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%s", a[int((NR+1)/2)]}')
  [ "$FR_REPS" -gt 1 ] && echo "  # qssh first reply over $FR_REPS runs (ms): $(printf '%s\n' "${frs[@]}" | sort -g | tr '\n' ' ')"
  sleep 0.5
  RT[qssh]=$(rtt 10.200.0.1)
  TP[qssh]=$(throughput 10.200.0.1)
  ns_clean
  grep -h "^vpn: peer .* sent" "$TMP/qb.err" "$TMP/qa.err" 2>/dev/null | sed 's/^/  # /' || true
}

# boringtun_listener: boringtun's listening side in A (10.201.0.1), configured with wg;
# writes $TMP/btb.sh, what a boringtun user runs on the dialing side (start it, configure
# it with wg, address and link up).
boringtun_listener() {
  local ia=bta$ID ib=btb$ID
  wg genkey >"$TMP/ka"; wg pubkey <"$TMP/ka" >"$TMP/pa"
  wg genkey >"$TMP/kb"; wg pubkey <"$TMP/kb" >"$TMP/pb"
  ip netns exec "$A" env WG_SUDO=1 "$BORINGTUN" --foreground --threads 1 --disable-drop-privileges "$ia" \
    >"$TMP/bta.log" 2>&1 &
  for _ in $(seq 1 200); do [ -S "/var/run/wireguard/$ia.sock" ] && break; sleep 0.02; done
  ip netns exec "$A" wg set "$ia" private-key "$TMP/ka" listen-port 51820 \
    peer "$(cat "$TMP/pb")" allowed-ips 10.201.0.2/32
  ip -n "$A" addr add 10.201.0.1/24 dev "$ia"
  ip -n "$A" link set "$ia" up
  cat >"$TMP/btb.sh" <<EOF
WG_SUDO=1 "$BORINGTUN" --foreground --threads 1 --disable-drop-privileges $ib >"$TMP/btb.log" 2>&1 &
for _ in \$(seq 1 5000); do [ -S /var/run/wireguard/$ib.sock ] && break; sleep 0.001; done
wg set $ib private-key "$TMP/kb" peer "$(cat "$TMP/pa")" endpoint $UNDER_A:51820 allowed-ips 10.201.0.0/24
ip addr add 10.201.0.2/24 dev $ib
ip link set $ib up
EOF
}

bench_boringtun() {
  topology
  boringtun_listener
  FR[boringtun]=$(first_reply 10.201.0.1 "$TMP/btb.sh.log" bash "$TMP/btb.sh")
  sleep 0.5
  RT[boringtun]=$(rtt 10.201.0.1)
  TP[boringtun]=$(throughput 10.201.0.1)
  ns_clean
  rm -f "/var/run/wireguard/bta$ID.sock" "/var/run/wireguard/btb$ID.sock"
}

# Both tunnels up at once over the same underlay, pinged alternately (IL_PINGS each,
# 50 ms apart, the series evenly out of phase): both see the same machine at the same
# moments, so their ratio holds still where separate runs of 20 pings swing by 30 %. With
# QSSH_BASE a second qssh build is a third tunnel (an A/B of two builds in the same run; two
# identical builds came out 0.96-1.07x of each other).
bench_interleaved() {
  topology
  boringtun_listener
  ip netns exec "$B" bash "$TMP/btb.sh"
  qssh_listener
  ip netns exec "$B" "${QSSH_DIAL[@]}" </dev/null >"$TMP/qb.out" 2>"$TMP/qb.err" &
  for _ in $(seq 1 200); do grep -q "interface .* up" "$TMP/qb.err" 2>/dev/null && break; sleep 0.02; done
  local dsts=(10.200.0.1 10.201.0.1) names=(qssh boringtun)
  if [ -n "$QSSH_BASE" ]; then
    # The baseline build: its own listener port (so its own UDP port) and VPN subnet.
    local idb
    idb=$("$QSSH_BASE" --home "$TMP/qb" id 2>/dev/null | head -n1)
    # shellcheck disable=SC2086
    ip netns exec "$A" "$QSSH_BASE" --home "$TMP/qa" listen --bind $UNDER_A --port 22333 \
      --vpn 10.203.0.1/24 --allow "$idb" $QSSH_BASE_ARGS </dev/null >"$TMP/qa2.out" 2>"$TMP/qa2.err" &
    for _ in $(seq 1 200); do grep -q "listening on" "$TMP/qa2.err" 2>/dev/null && break; sleep 0.02; done
    # shellcheck disable=SC2086
    ip netns exec "$B" "$QSSH_BASE" --home "$TMP/qb" connect $UNDER_A:22333 --accept-new \
      --vpn 10.203.0.2/24 $QSSH_BASE_ARGS </dev/null >"$TMP/qb2.out" 2>"$TMP/qb2.err" &
    for _ in $(seq 1 200); do grep -q "interface .* up" "$TMP/qb2.err" 2>/dev/null && break; sleep 0.02; done
    dsts+=(10.203.0.1) names+=(base)
  fi
  if [ -n "${IL_SWAP:-}" ]; then
    # boringtun's series first (which series goes first moves the results a little).
    dsts=("${dsts[1]}" "${dsts[0]}" "${dsts[@]:2}") names=("${names[1]}" "${names[0]}" "${names[@]:2}")
  fi
  local pin=()
  if [ -n "${IL_PIN:-}" ]; then
    # Two hosts on one machine: everything in A on CPU 1, everything in B on CPU 0.
    local p
    for p in $(ip netns pids "$A" | head -n 100); do taskset -a -pc 1 "$p" >/dev/null; done
    for p in $(ip netns pids "$B" | head -n 100); do taskset -a -pc 0 "$p" >/dev/null; done
    pin=(taskset -c 0)
  fi
  local d i pids=()
  for d in "${dsts[@]}"; do ip netns exec "$B" "${pin[@]}" ping -n -q -c 3 -i 0.1 "$d" >/dev/null || true; done
  # Series 50 ms apart each, started 50/N ms after one another.
  for i in "${!dsts[@]}"; do
    ip netns exec "$B" "${pin[@]}" ping -n -c "$IL_PINGS" -i 0.05 "${dsts[$i]}" >"$TMP/il-${names[$i]}" &
    pids+=($!)
    sleep "$(awk -v n="${#dsts[@]}" 'BEGIN { printf "%.3f", 0.05 / n }')"
  done
  if [ -n "$STAGES" ]; then
    perf record -q -a -o "$TMP/stages.data" \
      -e net:net_dev_queue,net:netif_receive_skb,sched:sched_switch,sched:sched_waking${EXTRA_EV:-} \
      -- sleep 8 >/dev/null 2>&1 || true
    perf script -i "$TMP/stages.data" -F comm,tid,cpu,time,event,trace 2>/dev/null | tee "${STAGES_KEEP:-/dev/null}" \
      | python3 bench/vpn_stages.py /dev/stdin >"$TMP/stages.txt" || true
  fi
  wait "${pids[@]}" || true
  for i in "${!dsts[@]}"; do IL[${names[$i]}]=$(median_rtt <"$TMP/il-${names[$i]}"); done
  ns_clean
  rm -f "/var/run/wireguard/bta$ID.sock" "/var/run/wireguard/btb$ID.sock"
}

median_rtt() {
  sed -n 's/.*time=\([0-9.]*\) ms/\1/p' | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%.3f", a[int((NR+1)/2)]}'
}

bench_ssh() {
  topology
  mkdir -p /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$TMP/hostkey"
  ssh-keygen -q -t ed25519 -N '' -f "$TMP/userkey"
  cp "$TMP/userkey.pub" "$TMP/authorized_keys"
  cat >"$TMP/sshd_config" <<EOF
ListenAddress $UNDER_A
Port 22
HostKey $TMP/hostkey
PermitRootLogin prohibit-password
AuthorizedKeysFile $TMP/authorized_keys
StrictModes no
UsePAM no
PermitTunnel yes
PidFile $TMP/sshd.pid
EOF
  ip netns exec "$A" "$(command -v sshd)" -f "$TMP/sshd_config" -D -e >"$TMP/sshd.log" 2>&1 &
  for _ in $(seq 1 200); do ip netns exec "$A" ss -ltn 2>/dev/null | grep -q ":22 " && break; sleep 0.02; done
  # What an `ssh -w` user runs: the client, then both ends' tun7 addressed and up (the
  # server end as soon as sshd created it).
  cat >"$TMP/ssh.sh" <<EOF
ssh -q -i "$TMP/userkey" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \\
  -o BatchMode=yes -w 7:7 -N root@$UNDER_A >"$TMP/ssh.log" 2>&1 &
for _ in \$(seq 1 10000); do
  ip link show tun7 >/dev/null 2>&1 && ip -n $A link show tun7 >/dev/null 2>&1 && break
  sleep 0.001
done
ip -n $A addr add 10.202.0.1/24 dev tun7; ip -n $A link set tun7 up
ip addr add 10.202.0.2/24 dev tun7; ip link set tun7 up
EOF
  FR[ssh]=$(first_reply 10.202.0.1 "$TMP/ssh.sh.log" bash "$TMP/ssh.sh")
  sleep 0.5
  RT[ssh]=$(rtt 10.202.0.1)
  TP[ssh]=$(throughput 10.202.0.1)
  ns_clean
}

for t in boringtun qssh ssh; do
  if [ -z "$ONLY" ] || [ "$ONLY" = "$t" ]; then "bench_$t"; fi
done
if { [ -z "$ONLY" ] || [ "$ONLY" = interleaved ]; } && [ "$IL_PINGS" -gt 0 ]; then bench_interleaved; fi

ratio() { python3 -c "
a, b = '$1', '$2'
try: print(f'{float(a)/float(b):.2f}x')
except Exception: print('-')"; }

printf '\n%-10s %22s %22s %24s\n' tunnel "TCP Gbit/s (median $REPS)" "ping RTT ms (avg 20)" "start to first reply ms"
for t in boringtun qssh ssh; do
  [ -n "${TP[$t]:-}" ] || continue
  printf '%-10s %12s %9s %12s %9s %14s %9s\n' "$( [ "$t" = ssh ] && echo 'ssh -w' || echo "$t")" \
    "${TP[$t]}" "$(ratio "${TP[$t]}" "${TP[boringtun]:-x}")" \
    "${RT[$t]}" "$(ratio "${RT[$t]}" "${RT[boringtun]:-x}")" \
    "${FR[$t]}" "$(ratio "${FR[$t]}" "${FR[boringtun]:-x}")"
done
if [ -n "${IL[qssh]:-}" ]; then
  printf 'ping RTT, both tunnels up, %s pings each, interleaved: qssh %s ms, boringtun %s ms (medians): %s\n' \
    "$IL_PINGS" "${IL[qssh]}" "${IL[boringtun]}" "$(ratio "${IL[qssh]}" "${IL[boringtun]}")"
fi
if [ -n "${IL[base]:-}" ]; then
  printf 'same run, baseline qssh (%s): %s ms; qssh/baseline %s, baseline/boringtun %s\n' \
    "$QSSH_BASE" "${IL[base]}" "$(ratio "${IL[qssh]}" "${IL[base]}")" "$(ratio "${IL[base]}" "${IL[boringtun]}")"
fi
echo "(ratios are to boringtun in this run; qssh flags: ${QSSH_ARGS:-default})"
if [ -n "$STAGES" ] && [ -s "$TMP/stages.txt" ]; then
  printf '\nOne ping, stage by stage (kernel tracepoints, 8 s of the interleaved run):\n'
  cat "$TMP/stages.txt"
fi
