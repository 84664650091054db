"""A free TCP port for a listener started a moment later (tests, benchmarks, a local demo).

The usual trick, binding port 0 and closing, hands out a port from the kernel's ephemeral range
(32768-60999 on Linux). Every outgoing connection takes its local port from that same range, and a
Ray node makes many; by the time the listener binds, one of them may hold the port. Ray Serve's gRPC
proxy binds `[::]:port`, which then fails ("Failed to bind to address [::]:33007"). So the port
comes from below the ephemeral range and above Ray's worker ports (10002-19999), and is checked on
every interface, IPv4 and IPv6, before it is handed out."""

import errno
import random
import socket

FIRST, LAST = 20_000, 32_767  # between Ray's worker ports and the kernel's ephemeral range


def _bindable(port: int) -> bool:
    addresses = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        addresses.append((socket.AF_INET6, "::"))
    for family, host in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as err:
            if family == socket.AF_INET6 and err.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 on this machine: IPv4 decides
            return False
    return True


def free_port() -> int:
    """A port nothing is bound to on any interface, outside the ephemeral range."""
    rng = random.Random()  # the system's entropy: parallel callers must not walk the same ports
    for _ in range(1000):
        port = rng.randint(FIRST, LAST)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free TCP port between {FIRST} and {LAST}")
