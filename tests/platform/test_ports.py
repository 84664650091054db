import socket

from moray.platform import ports


def test_ports_come_from_below_the_ephemeral_range():
    low, _ = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(20):
        assert ports.FIRST <= ports.free_port() <= ports.LAST < low


def test_a_port_held_on_any_interface_is_skipped(monkeypatch):
    """A port held on 0.0.0.0 (as an outgoing connection or another listener would) is not handed
    out; the next candidate is."""
    held = socket.socket()
    held.bind(("0.0.0.0", 0))
    taken = held.getsockname()[1]
    candidates = iter([taken, taken, ports.FIRST + 7])
    monkeypatch.setattr(ports.random.Random, "randint", lambda self, a, b: next(candidates))
    try:
        assert ports.free_port() == ports.FIRST + 7
    finally:
        held.close()
