#!/usr/bin/env python3
"""Per-stage timeline of VPN pings, from kernel tracepoints (no tcpdump in the path).

Input: `perf script -F comm,tid,cpu,time,event,trace` of a `perf record -a -e
net:net_dev_queue,net:netif_receive_skb,sched:sched_switch,sched:sched_waking` taken while
bench/vpn.sh pings through the qssh (TUN qvpn*) and boringtun (TUN bt*) tunnels at once
(`STAGES=1 ONLY=interleaved bash bench/vpn.sh` does both). B is the pinging host, A the
answering one. For every echo request that ping queues on B's TUN, it follows:

  t1  ping queues the request on B's TUN          (net_dev_queue, comm ping)
  t2  B's packet thread is switched in            (sched_switch)
  t3  B's thread sends the record on eth0         (net_dev_queue dev=eth0, B's thread)
  t5  A's packet thread is switched in            (sched_switch; absent if it was running)
  t6  A's thread writes the request into its TUN  (netif_receive_skb on A's TUN)
  t7  A's kernel queues the echo reply on the TUN (net_dev_queue)
  t8  A's thread sends the reply record on eth0
  t10 B's thread is switched in again             (absent if it was running)
  t11 B's thread writes the reply into its TUN
  t12 ping is switched in

and prints each stage's median (µs) for both tunnels, then how the answering thread got to
run: woken on the CPU that sent it the record (fast), woken on the other CPU (on these VMs
an idle vCPU is halted, and waking it is slow), or running already, with the median time
from the record leaving B to the thread running for each of the first two, and how often
B's thread, woken by ping, preempted it (ping still runnable). Then the stages again for
each of the two ways A's thread was woken.

Which way that is follows from the preemption: with ping still runnable on B's CPU, the
scheduler puts A's thread on the idle CPU (the slow wake-up), and otherwise on B's CPU.
Whether B's thread preempts ping is EEVDF's choice from both tasks' lag, and it alternates
from ping to ping; the stage medians of one way are steadier than the mixed medians.
"""
import collections
import re
import statistics
import sys

LINE = re.compile(r"\s*(\S.*?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)")
SWITCH = re.compile(
    r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)
DEV = re.compile(r"dev=(\S+)")
# Tunnel by its TUN device's name, and its packet thread's name.
TUNNELS = {"qssh": ("qvpn", "qssh-vpn-packet"), "boringtun": ("bt", "boringtun-cli")}
STAGES = [
    ("B woken by ping", "t1", "t2"),
    ("B turn to UDP send", "t2", "t3"),
    ("UDP to A running", "t3", "t5"),
    ("A turn to TUN write", "t5", "t6"),
    ("A kernel answers", "t6", "t7"),
    ("A TUN read to UDP send", "t7", "t8"),
    ("A send to B running", "t8", "t10"),
    ("B turn to TUN write", "t10", "t11"),
    ("TUN to ping running", "t11", "t12"),
    ("whole round trip", "t1", "t12"),
]
WINDOW_US = 5000  # a ping's events all fall within this of its request


def tunnel_of(dev):
    return next((t for t, (prefix, _) in TUNNELS.items() if dev.startswith(prefix)), None)


def perf_lines(path):
    """The events of a `perf script -F comm,tid,cpu,time,event,trace` text, as (comm, tid,
    cpu, time in µs, event, trace) in file order (bench/vpn_turns.py reads them too)."""
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                comm, tid, cpu, t, event, trace = m.groups()
                yield comm, int(tid), int(cpu), float(t) * 1e6, event, trace


def parse(path):
    events = []
    for comm, tid, cpu, t, event, trace in perf_lines(path):
        sw = SWITCH.search(trace) if event == "sched:sched_switch" else None
        dev = DEV.search(trace)
        events.append(
            {
                "t": t,
                "comm": comm,
                "tid": tid,
                "cpu": cpu,
                "event": event,
                "dev": dev.group(1) if dev else None,
                "next": (sw.group(4), int(sw.group(5))) if sw else None,
                # The task switched out still runnable (preempted), or not.
                "preempted": sw.group(3).startswith("R") if sw else None,
            }
        )
    events.sort(key=lambda e: e["t"])
    return events


def follow(events, i, tunnel):
    """The timeline of the ping whose request is events[i], or None if incomplete."""
    thread = TUNNELS[tunnel][1]
    start = events[i]
    ts = {"t1": start["t"]}
    b = a = send_cpu = None
    for e in events[i + 1 :]:
        if e["t"] - start["t"] > WINDOW_US:
            return None
        nxt = e["next"]
        on_tun = e["dev"] is not None and tunnel_of(e["dev"]) == tunnel
        if "t2" not in ts:
            if nxt and nxt[0] == thread:
                ts["t2"], b = e["t"], nxt[1]
                ts["b_preempted"] = e["preempted"]
        elif "t3" not in ts:
            if e["event"] == "net:net_dev_queue" and e["dev"] == "eth0" and e["tid"] == b:
                ts["t3"], send_cpu = e["t"], e["cpu"]
        elif "t6" not in ts:
            if nxt and nxt[0] == thread and nxt[1] != b:
                ts["t5"], a = e["t"], nxt[1]
                ts["a_woken"] = "same CPU" if e["cpu"] == send_cpu else "other CPU"
            elif e["event"] == "net:netif_receive_skb" and on_tun and e["tid"] != b:
                ts["t6"] = e["t"]
                if a is None:
                    a, ts["a_woken"] = e["tid"], "running"
        elif "t7" not in ts:
            if e["event"] == "net:net_dev_queue" and on_tun:
                ts["t7"] = e["t"]
        elif "t8" not in ts:
            if e["event"] == "net:net_dev_queue" and e["dev"] == "eth0" and e["tid"] == a:
                ts["t8"] = e["t"]
        elif "t11" not in ts:
            if nxt and nxt == (thread, b):
                ts["t10"] = e["t"]
            elif e["event"] == "net:netif_receive_skb" and on_tun and e["tid"] == b:
                ts["t11"] = e["t"]
        elif nxt and nxt[1] == start["tid"]:
            ts["t12"] = e["t"]
            return ts
    return None


def main(path):
    events = parse(path)
    stages = {t: collections.defaultdict(list) for t in TUNNELS}
    woken = {t: collections.Counter() for t in TUNNELS}
    by_cpu = {t: collections.defaultdict(list) for t in TUNNELS}
    for i, e in enumerate(events):
        if not (e["event"] == "net:net_dev_queue" and e["comm"] == "ping" and e["dev"]):
            continue
        tunnel = tunnel_of(e["dev"])
        if tunnel is None:
            continue
        ts = follow(events, i, tunnel)
        if ts is None:
            continue
        woken[tunnel][ts["a_woken"]] += 1
        if ts["b_preempted"]:
            woken[tunnel]["b preempted"] += 1
        if "t5" in ts:
            stages[tunnel]["woken " + ts["a_woken"]].append(ts["t5"] - ts["t3"])
        for name, frm, to in STAGES:
            if frm in ts and to in ts:
                stages[tunnel][name].append(ts[to] - ts[frm])
                by_cpu[tunnel][(name, ts["a_woken"])].append(ts[to] - ts[frm])
    print(f"{'stage (median µs, samples)':<28}" + "".join(f"{t:>20}" for t in TUNNELS))
    for name, _, _ in STAGES:
        cells = []
        for t in TUNNELS:
            v = stages[t][name]
            cells.append(f"{statistics.median(v):8.1f} (n={len(v):3d})" if v else "-")
        print(f"{name:<28}" + "".join(f"{c:>20}" for c in cells))
    for t in TUNNELS:
        w = woken[t]
        same, other = (stages[t]["woken " + c] for c in ("same CPU", "other CPU"))
        print(
            f"{t}: A woken on the sender's CPU {w['same CPU']} (UDP to A running "
            f"{statistics.median(same) if same else 0:.1f} µs), on the other CPU "
            f"{w['other CPU']} ({statistics.median(other) if other else 0:.1f} µs), "
            f"running already {w['running']}, of {w.total() - w['b preempted']} pings; "
            f"B's thread preempted ping in {w['b preempted']}"
        )
    # The same stages for each way A's thread got a CPU: the mix of the two moves the
    # medians above by more than any one stage does.
    for how, label in (("same CPU", "the sender's CPU"), ("other CPU", "the other CPU")):
        print(f"\nA woken on {label} only:")
        for name, _, _ in STAGES:
            cells = []
            for t in TUNNELS:
                v = by_cpu[t][(name, how)]
                cells.append(f"{statistics.median(v):8.1f} (n={len(v):3d})" if v else "-")
            print(f"{name:<28}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1])
