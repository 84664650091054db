"""A tensor link between a Serve replica and one of its actors (an expert shard, a pipeline stage).

Ray carries the control plane (start, attach, health); the per-layer traffic goes over a two-rank
gloo process group of its own, built directly (`ProcessGroupGloo`, no global `init_process_group`),
so a process can hold any number of links and re-form one without touching the others.

Why not Ray calls for the data: one round of 8 decode rows to 2 actors measured about 2.9 ms as Ray
actor calls and about 3.0 ms through a Ray Compiled Graph on this 2-core machine, against about
0.5 ms as gloo sends and receives (benchmarks/bench_expert_dispatch.py prints all three).

The replica is rank 0 and hosts the rendezvous (a TCPStore on a free port); the actor is rank 1 and
connects to it. A peer that dies breaks the link: the pending operation raises (`LinkBroken`)
instead of hanging, and the link is re-formed with a new rendezvous.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=60)
HEADER = 4  # int64 words: op, layer, rows, spare


class LinkBroken(RuntimeError):
    """The peer of a link is gone (its process died, or the operation timed out)."""


def _host_ip() -> str:
    """This node's address as Ray knows it (what the peer, maybe on another node, can reach)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 -- outside Ray, fall back to the loopback
        pass
    return socket.gethostbyname("localhost")


class Rendezvous:
    """Rank 0's side: a TCPStore on a free port that the peer connects to."""

    def __init__(self):
        self.host = _host_ip()
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        self.port = self.store.port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class Link:
    """One end of a two-rank gloo group. `send`/`recv` move whole tensors; every operation names the
    peer implicitly (the other rank) and raises LinkBroken when the peer is gone."""

    def __init__(self, store: dist.Store, rank: int, name: str, timeout: datetime.timedelta = TIMEOUT):
        self.rank, self.peer = rank, 1 - rank
        self.group = dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2, timeout)

    @classmethod
    def connect(cls, address: tuple[str, int], name: str) -> Link:
        """Rank 1: join the rendezvous rank 0 published."""
        host, port = address
        store = dist.TCPStore(host, port, is_master=False, timeout=TIMEOUT)
        return cls(store, 1, name)

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out waiting ..."
            raise LinkBroken(str(e)) from None

    def send_async(self, *tensors: torch.Tensor) -> list:
        """Start the sends; the caller waits with `wait(works)` (keep the tensors alive till then)."""
        try:
            return [self.group.send([t], self.peer, 0) for t in tensors]
        except RuntimeError as e:  # the pair is already closed
            raise LinkBroken(str(e)) from None

    def recv_async(self, shape, dtype=torch.float32) -> tuple[torch.Tensor, object]:
        out = torch.empty(shape, dtype=dtype)
        try:
            return out, self.group.recv([out], self.peer, 0)
        except RuntimeError as e:
            raise LinkBroken(str(e)) from None

    def wait(self, works) -> None:
        for w in works:
            self._wait(w)

    def send(self, *tensors: torch.Tensor) -> None:
        tensors = tuple(t.contiguous() for t in tensors)
        self.wait(self.send_async(*tensors))

    def recv(self, shape, dtype=torch.float32) -> torch.Tensor:
        out, work = self.recv_async(shape, dtype)
        self._wait(work)
        return out

    def send_header(self, op: int, layer: int = 0, rows: int = 0) -> None:
        self.send(torch.tensor([op, layer, rows, 0], dtype=torch.int64))

    def recv_header(self) -> tuple[int, int, int]:
        op, layer, rows, _ = self.recv((HEADER,), torch.int64).tolist()
        return op, layer, rows

    def close(self) -> None:
        try:
            self.group.abort()
        except Exception:  # noqa: BLE001 -- closing a broken link: nothing left to do
            pass
