"""The gRPC API through Ray Serve's gRPC proxy: unary Generate, server-streaming GenerateStream,
and INVALID_ARGUMENT for a bad request."""

import grpc
import pytest

from moray.jobs.serve.proto import moray_pb2, moray_pb2_grpc


@pytest.fixture(scope="module")
def stub(serve_app):
    channel = grpc.insecure_channel(serve_app.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield moray_pb2_grpc.MorayGenerateStub(channel)
    channel.close()


META = (("application", "moray"),)


def test_generate_and_stream_agree(stub):
    req = moray_pb2.GenerateRequest(prompt="My lord", max_tokens=8, temperature=0.0, ignore_eos=True)
    full = stub.Generate(req, metadata=META, timeout=60)
    assert len(full.token_ids) == 8 and full.finish_reason == "length" and full.completion_tokens == 8
    assert full.prompt_tokens > 0
    chunks = list(stub.GenerateStream(req, metadata=META, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == "length" and all(not c.finish_reason for c in chunks[:-1])


def test_token_ids_and_seed(stub):
    req = moray_pb2.GenerateRequest(
        prompt_ids=[5, 6, 7], max_tokens=6, temperature=1.0, seed=3, ignore_eos=True
    )
    a = stub.Generate(req, metadata=META, timeout=60)
    b = stub.Generate(req, metadata=META, timeout=60)
    assert list(a.token_ids) == list(b.token_ids) and a.prompt_tokens == 3


def test_bad_request_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(
            moray_pb2.GenerateRequest(prompt_ids=[5] * 2000, max_tokens=4), metadata=META, timeout=60
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in e.value.details()
