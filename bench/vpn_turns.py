#!/usr/bin/env python3
"""The system calls of each packet-thread turn, qssh's against boringtun's.

Input: the `perf script` text that `STAGES=1 STAGES_KEEP=FILE
EXTRA_EV=,raw_syscalls:sys_enter,raw_syscalls:sys_exit ONLY=interleaved bash bench/vpn.sh`
keeps in FILE. A turn runs from the packet thread's switch-in to its switch-out. Turns with
the same sequence of events (system call entries `>` and exits `<`, packets queued on or
received from a device) are grouped, and for the most common groups each event is printed
with its median time in µs after the switch-in. Tracing every system call slows each one
down (and keeps both CPUs busy, so every answering thread is woken on the sender's CPU),
so compare the two tunnels within one recording, not with other runs.
"""
import collections
import re
import statistics
import sys

from vpn_stages import DEV, SWITCH, TUNNELS, perf_lines

SYSCALL = re.compile(r"NR (\d+)")
# x86-64 numbers of the calls these loops make.
NAMES = {0: "read", 1: "write", 19: "readv", 20: "writev", 44: "sendto", 45: "recvfrom",
         46: "sendmsg", 47: "recvmsg", 202: "futex", 232: "epoll_wait", 233: "epoll_ctl",
         281: "epoll_pwait", 299: "recvmmsg", 307: "sendmmsg", 441: "epoll_pwait2"}
# Packet threads by name, and the tunnel each belongs to.
THREADS = {thread: tunnel for tunnel, (_, thread) in TUNNELS.items()}
GROUPS_SHOWN = 4
MIN_TURNS = 10


def turns(path):
    """Each tunnel's turns, as lists of (µs, event label)."""
    running = {}
    done = collections.defaultdict(list)
    for _, tid, _, t, event, trace in perf_lines(path):
        if event == "sched:sched_switch":
            sw = SWITCH.search(trace)
            if not sw:
                continue
            prev, next_comm, next_pid = int(sw.group(2)), sw.group(4), int(sw.group(5))
            if prev in running:
                done[THREADS[sw.group(1)]].append(running.pop(prev))
            if next_comm in THREADS:
                running[next_pid] = [(t, "in")]
        elif tid in running:
            if event.startswith("raw_syscalls:"):
                nr = int(SYSCALL.search(trace).group(1))
                mark = ">" if event.endswith("enter") else "<"
                running[tid].append((t, mark + NAMES.get(nr, str(nr))))
            elif event.startswith("net:"):
                dev = DEV.search(trace)
                what = "queued" if event == "net:net_dev_queue" else "received"
                running[tid].append((t, f"{what}@{dev.group(1) if dev else '?'}"))
    return done


def main(path):
    for tunnel, seqs in sorted(turns(path).items()):
        groups = collections.defaultdict(list)
        for seq in seqs:
            groups[tuple(label for _, label in seq)].append([t - seq[0][0] for t, _ in seq])
        print(f"{tunnel}: {len(seqs)} turns")
        common = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:GROUPS_SHOWN]
        for labels, rows in common:
            if len(rows) < MIN_TURNS:
                continue
            medians = [statistics.median(r[i] for r in rows) for i in range(len(labels))]
            print(f"  {len(rows):4d} turns: "
                  + "  ".join(f"{label} {m:.0f}" for label, m in zip(labels, medians)))


if __name__ == "__main__":
    main(sys.argv[1])
