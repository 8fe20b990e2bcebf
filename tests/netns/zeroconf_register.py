#!/usr/bin/env python3
"""A foreign mDNS responder for qssh's interop test: python-zeroconf registers a
_qssh._udp.local. service with the TXT keys qssh uses (id, name, v, port; no inst), prints
"ready", keeps it registered until stdin closes or SECONDS pass, then unregisters.

usage: zeroconf_register.py PEER_ID NAME PORT IPV4 [SECONDS]"""

import select
import socket
import sys
import time

from zeroconf import IPVersion, ServiceInfo, Zeroconf

SERVICE = "_qssh._udp.local."


def main():
    peer_id, name, port, ipv4 = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    info = ServiceInfo(
        SERVICE,
        f"{name} (python-zeroconf).{SERVICE}",
        addresses=[socket.inet_aton(ipv4)],
        port=port,
        properties={"id": peer_id, "name": name, "v": "1", "port": str(port)},
        server=f"zc-{peer_id[:12]}.local.",
    )
    zc = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        zc.register_service(info)
        print("ready", flush=True)
        # Bounded: until stdin closes or the deadline.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sys.stdin], [], [], 0.2)
            if ready and not sys.stdin.readline():
                break
        zc.unregister_service(info)
    finally:
        zc.close()


if __name__ == "__main__":
    main()
