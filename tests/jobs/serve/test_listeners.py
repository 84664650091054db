"""What a local run exposes to the network, read from the processes' own sockets: with the Serve
application up, every listener of this process and of everything it started (Ray's GCS, raylet,
agents, workers, the Serve controller, proxy and replica) is on loopback, except two that Ray Serve
binds to every interface with no setting to change it, and each of those refuses a caller without
credentials: the gRPC proxy (moray's API keys) and the replica's inter-deployment gRPC server (Ray's
token)."""

import grpc
import psutil
import pytest

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets():
    """(process title, address, port) for every listening TCP socket of this process and its
    descendants (Ray's processes are children of the driver that started the local Ray)."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            title = f"{proc.name()} {' '.join(proc.cmdline())[:200]}"
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((title, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that exited while we looked
    return found


def call_without_credentials(port: int, method: str, metadata=()) -> grpc.RpcError:
    """An empty request to `method`, with no API key and no Ray token; the error it gets."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=30)
    return e.value


def test_a_local_run_listens_on_loopback_only(serve_app):
    sockets = listening_sockets()
    titles = {title for title, _, _ in sockets}
    # the check saw the whole run, not just this process
    for part in ("gcs_server", "raylet", "ServeController", "ProxyActor", "ServeReplica"):
        assert any(part in t for t in titles), (part, sorted(titles))

    grpc_proxy_port = int(serve_app.grpc_target.rsplit(":", 1)[1])
    exposed = [(t, ip, port) for t, ip, port in sockets if ip not in LOOPBACK]
    proxy = [s for s in exposed if s[2] == grpc_proxy_port]
    replica = [s for s in exposed if "ServeReplica" in s[0]]
    assert sorted(exposed) == sorted(proxy + replica), f"listening beyond loopback: {exposed}"
    assert len(proxy) == 1 and len(replica) <= 1, exposed

    # the gRPC proxy: moray's API keys
    error = call_without_credentials(
        grpc_proxy_port, "/moray.MorayGenerate/Generate", (("application", "moray"),)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in error.details()
    # the replica's own server: Ray's token authentication
    for _, _, port in replica:
        error = call_without_credentials(port, "/ray.serve.ASGIService/HandleRequest")
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
        assert "authentication token" in error.details()
