#!/usr/bin/env python3
"""Independent view of qssh's mDNS records: python-zeroconf browses _qssh._udp.local. for
SECONDS (default 3), resolves every instance it sees, and prints one JSON list of
{"instance", "port", "server", "addresses", "properties"} on stdout. Used by
tests/discovery_netns.rs to check that a standard DNS-SD browser sees what qssh announces."""

import json
import sys
import time

from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

SERVICE = "_qssh._udp.local."


class Names(ServiceListener):
    def __init__(self):
        self.names = set()

    def add_service(self, zc, type_, name):
        self.names.add(name)

    def update_service(self, zc, type_, name):
        self.names.add(name)

    def remove_service(self, zc, type_, name):
        self.names.discard(name)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    zc = Zeroconf(ip_version=IPVersion.V4Only)
    listener = Names()
    browser = ServiceBrowser(zc, SERVICE, listener)
    found = {}
    deadline = time.monotonic() + seconds
    try:
        # Bounded: ends at the deadline; each resolution waits at most 1 s.
        while time.monotonic() < deadline:
            for name in sorted(listener.names - set(found)):
                info = zc.get_service_info(SERVICE, name, timeout=1000)
                if info is None:
                    continue
                found[name] = {
                    "instance": name,
                    "port": info.port,
                    "server": info.server,
                    "addresses": info.parsed_addresses(),
                    "properties": {
                        k.decode("utf-8", "replace"): (v.decode("utf-8", "replace") if v is not None else None)
                        for k, v in info.properties.items()
                    },
                }
            time.sleep(0.1)
    finally:
        browser.cancel()
        zc.close()
    print(json.dumps(sorted(found.values(), key=lambda s: s["instance"])))


if __name__ == "__main__":
    main()
