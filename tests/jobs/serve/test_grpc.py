"""The gRPC API through Ray Serve's gRPC proxy: unary Generate, server-streaming GenerateStream,
the API keys (UNAUTHENTICATED without one), INVALID_ARGUMENT for a bad request and RESOURCE_EXHAUSTED
when the engine's queue is full."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from moray.jobs.serve.proto import moray_pb2, moray_pb2_grpc


@pytest.fixture(scope="module")
def stub(serve_app):
    channel = grpc.insecure_channel(serve_app.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield moray_pb2_grpc.MorayGenerateStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def meta(serve_app):
    return (("application", "moray"), ("authorization", f"Bearer {serve_app.api_key}"))


def test_generate_and_stream_agree(stub, meta):
    req = moray_pb2.GenerateRequest(prompt="My lord", max_tokens=8, temperature=0.0, ignore_eos=True)
    full = stub.Generate(req, metadata=meta, timeout=60)
    assert len(full.token_ids) == 8 and full.finish_reason == "length" and full.completion_tokens == 8
    assert full.prompt_tokens > 0
    chunks = list(stub.GenerateStream(req, metadata=meta, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == "length" and all(not c.finish_reason for c in chunks[:-1])


def test_token_ids_and_seed(stub, meta):
    req = moray_pb2.GenerateRequest(
        prompt_ids=[5, 6, 7], max_tokens=6, temperature=1.0, seed=3, ignore_eos=True
    )
    a = stub.Generate(req, metadata=meta, timeout=60)
    b = stub.Generate(req, metadata=meta, timeout=60)
    assert list(a.token_ids) == list(b.token_ids) and a.prompt_tokens == 3


def test_bad_request_is_invalid_argument(stub, meta):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(
            moray_pb2.GenerateRequest(prompt_ids=[5] * 2000, max_tokens=4), metadata=meta, timeout=60
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in e.value.details()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "sk-moray-test"])
def test_missing_or_wrong_key_is_unauthenticated(stub, authorization):
    """The keys that guard HTTP guard gRPC too (its port listens on every interface): no key, a wrong
    key, and the right key without `Bearer` are all refused before the engine sees the request."""
    metadata = (("application", "moray"),) + ((("authorization", authorization),) if authorization else ())
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(moray_pb2.GenerateRequest(prompt="Hi", max_tokens=2), metadata=metadata, timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in e.value.details()


def test_overload_is_resource_exhausted(stub, meta):
    """4 running + 4 waiting fit (the package's engine settings); a burst of 16 long requests gets
    RESOURCE_EXHAUSTED for the overflow while the rest complete."""
    req = moray_pb2.GenerateRequest(prompt="Now is the winter", max_tokens=400, ignore_eos=True)

    def one(_):
        try:
            return stub.Generate(req, metadata=meta, timeout=120).completion_tokens
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in results, results
    assert all(r == 400 for r in results if r != grpc.StatusCode.RESOURCE_EXHAUSTED), results
    assert sum(r == 400 for r in results) >= 4
