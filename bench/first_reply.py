#!/usr/bin/env python3
"""Time from starting a command to the first ICMP echo reply from DST.

Usage: first_reply.py DST TIMEOUT_S LOG -- COMMAND...

Starts COMMAND with stdout and stderr to LOG (it keeps running in the background), then
sends an echo request every millisecond from a raw socket (root) until one is answered,
and prints the milliseconds from the command's start to that reply. Sends that fail
(no route yet: the tunnel interface does not exist) are retried; the loop is bounded by
TIMEOUT_S. One long-lived prober gives ~1 ms resolution, unlike a loop of ping processes.
"""
import os
import select
import socket
import struct
import subprocess
import sys
import time


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def main():
    dst, timeout, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    t0 = time.monotonic()
    out = open(log, "w")
    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    seq = 0
    while time.monotonic() - t0 < timeout:
        seq = (seq + 1) & 0xFFFF
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"qssh-bench"
        pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr), ident, seq) + b"qssh-bench"
        try:
            sock.sendto(pkt, (dst, 0))
        except OSError:
            pass
        end = time.monotonic() + 0.001
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                continue
            data, (src, _) = sock.recvfrom(2048)
            ihl = (data[0] & 15) * 4
            t, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src == dst and t == 0 and rid == ident:
                print(f"{(time.monotonic() - t0) * 1000:.1f}", flush=True)
                return
    print("timeout", flush=True)


main()
