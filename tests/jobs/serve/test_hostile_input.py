"""Hostile and malformed requests against the FastAPI app (in-process, over a real engine and
tokenizer): body-size limit, text too long to fit refused before tokenizing, lone surrogates,
error messages that name the field and the rule, and the API key checked before the body."""

import json

import pytest
import torch

from moray.actors.engine import AsyncEngine, Engine, EngineConfig, Tokenizer
from moray.jobs.serve.server import OpenAIServer
from moray.model import Transformer, preset

KEY = "sk-hostile"
LIMIT = 64 << 10  # a small body limit, so the test sends little


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_position_embeddings=64)).eval()
    e = AsyncEngine(Engine(model, Tokenizer.from_dir(tiny_model_dir), EngineConfig()))
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    from starlette.testclient import TestClient

    server = OpenAIServer(engine, "tiny", [KEY], max_request_bytes=LIMIT)
    with TestClient(server.build_app(), raise_server_exceptions=False) as c:
        yield c


def post(client, path, body, key=KEY, **headers):
    content = body if isinstance(body, bytes) else json.dumps(body)
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}", **headers}
    return client.post(path, content=content, headers=headers)


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(client):
    big = {"model": "tiny", "prompt": "x" * LIMIT}
    err = error(post(client, "/v1/completions", big), 413)
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        yield json.dumps(big).encode()

    err = error(
        client.post("/v1/completions", content=chunked(), headers={"authorization": f"Bearer {KEY}"}), 413
    )
    assert err["code"] == "request_too_large"
    ok = post(client, "/v1/completions", {"model": "tiny", "prompt": "Hark", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_text_that_cannot_fit_is_refused_before_tokenizing(client, engine):
    limit = engine.engine.max_prompt_chars
    assert limit == 4 * 64 * max(len(engine.engine.tokenizer.decode([i])) for i in range(512))
    for path, body in [
        ("/v1/completions", {"model": "tiny", "prompt": "a" * (limit + 1)}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a" * limit}]}),
    ]:
        err = error(post(client, path, body), 400)
        assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    # below the character bound, the token count decides (the engine's own check)
    err = error(post(client, "/v1/completions", {"model": "tiny", "prompt": "the king " * 40}), 400)
    assert err["code"] == "context_length_exceeded" and "prompt tokens" in err["message"]


def test_lone_surrogates_are_400(client):
    raw = b'{"model": "tiny", "prompt": "a\\ud800b"}'  # JSON's escape: valid JSON, not valid text
    err = error(post(client, "/v1/completions", raw), 400)
    assert (
        err["type"] == "invalid_request_error" and err["param"] == "prompt" and "surrogate" in err["message"]
    )
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udc00"}]}'
    err = error(post(client, "/v1/chat/completions", raw), 400)
    assert err["param"] == "messages.0.content" and "surrogate" in err["message"]
    raw = b'{"model": "tiny\\ud800", "prompt": "hi"}'
    assert error(post(client, "/v1/completions", raw), 400)["param"] == "model"


@pytest.mark.parametrize(
    "body, param, message",
    [
        (b"{not json", None, "We could not parse the JSON body of your request: Expecting property name"),
        (b"[1, 2]", None, "The request body must be a JSON object, not an array."),
        ({"model": "tiny", "prompt": "hi", "stop": ["x"] * 100}, "stop", "stop: at most 4 item(s), got 100"),
        ({"model": "tiny", "prompt": []}, "prompt", "prompt: at least 1 item(s), got 0"),
        ({"model": "tiny", "prompt": 7}, "prompt", "prompt: expected a string, an array of token ids or"),
        ({"model": "tiny", "prompt": [1, "a"]}, "prompt.1", "prompt.1: expected an integer, got a string"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens: must be >= 1, got 0"),
        ({"model": "tiny", "prompt": "hi", "seed": "1"}, "seed", "seed: expected an integer, got a string"),
        ({"model": "tiny", "prompt": "hi", "n_best": 2}, "n_best", "n_best: is not a known parameter"),
        ({"prompt": "hi"}, "model", "model: is required"),
    ],
)
def test_error_messages_name_the_field_and_the_rule(client, body, param, message):
    err = error(post(client, "/v1/completions", body), 400)
    assert err["param"] == param and err["message"].startswith(message)


def test_chat_field_errors(client):
    body = {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}
    err = error(post(client, "/v1/chat/completions", body), 400)
    assert err["param"] == "messages.0.role" and "must be 'system', 'developer', 'user'" in err["message"]
    err = error(post(client, "/v1/chat/completions", {"model": "tiny", "messages": []}), 400)
    assert err["message"] == "messages: at least 1 item(s), got 0"


def test_the_api_key_is_checked_before_the_body(client):
    for body in (b"{not json", b"x" * (LIMIT + 1), {"model": "tiny", "prompt": []}):
        err = error(post(client, "/v1/completions", body, key="wrong"), 401)
        assert err["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200  # health needs no key
