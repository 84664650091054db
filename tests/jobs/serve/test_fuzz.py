"""Bad input never gets a 5xx: hypothesis throws malformed JSON, wrong types, out-of-range and
unknown fields at the FastAPI app (in-process, over a real engine) and checks every answer is a
2xx or a 4xx with OpenAI's error body."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moray.actors.engine import AsyncEngine, Engine, EngineConfig, Tokenizer
from moray.jobs.serve.server import OpenAIServer
from moray.model import Transformer, preset


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    from starlette.testclient import TestClient

    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_position_embeddings=48)).eval()  # short outputs: fast
    engine = AsyncEngine(Engine(model, Tokenizer.from_dir(tiny_model_dir), EngineConfig(max_waiting=64)))
    with TestClient(OpenAIServer(engine, "tiny").build_app(), raise_server_exceptions=False) as c:
        yield c
    engine.shutdown()


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
small_ints = st.integers(-5, 40) | st.sampled_from([0, 2**31, 2**63, -(2**63), 10**9])
# Mostly valid bodies (so the engine runs), each then maybe corrupted in one field.
valid = {
    "max_tokens": st.integers(1, 40),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.text(max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
}
keys = [
    *valid,
    "model",
    "prompt",
    "messages",
    "n",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "extra",
]
bad_values = (
    anything | small_ints | st.floats(-1e9, 1e9) | st.sampled_from([float("nan"), float("inf"), "", [], {}])
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
        "content": st.text(max_size=30),
    },
    optional={"name": st.text(max_size=5)},
)


def corrupt(body_key_value):
    body, key, value = body_key_value
    if key is not None:
        body = {**body, key: value}
    return body


def fuzzed(required):
    base = st.fixed_dictionaries({"model": st.just("tiny"), **required}, optional=valid)
    return st.tuples(base, st.sampled_from([None, *keys]), bad_values).map(corrupt)


completion_body = fuzzed(
    {"prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 511), min_size=1, max_size=8)}
)
chat_body = fuzzed({"messages": st.lists(message, min_size=1, max_size=3)})
completion_extra = fuzzed({"logprobs": st.integers(-1, 6), "prompt": st.text(max_size=20)})
chat_extra = fuzzed(
    {"messages": st.lists(message, max_size=2), "logprobs": st.booleans(), "top_logprobs": small_ints}
)


def post(client, path: str, body) -> object:
    # json.dumps writes NaN/Infinity literals, which the server's parser accepts: the models must refuse them
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif "text/event-stream" in response.headers.get("content-type", ""):
        assert response.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=completion_body | completion_extra)
def test_completions_fuzz(client, body):
    check(post(client, "/v1/completions", body))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_body | chat_extra)
def test_chat_fuzz(client, body):
    check(post(client, "/v1/chat/completions", body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=60) | anything.map(lambda x: json.dumps(x).encode()))
def test_raw_bodies_fuzz(client, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        check(client.post(path, content=raw, headers={"content-type": "application/json"}))
