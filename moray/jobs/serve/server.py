"""The OpenAI-compatible HTTP API over an `AsyncEngine`, as a FastAPI app.

`OpenAIServer` is plain Python (no Serve): the Serve deployment in app.py holds one, and tests
can drive its FastAPI app in-process."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moray.actors.engine import (
    AsyncEngine,
    CacheTooSmall,
    ContextLengthExceeded,
    EngineError,
    Overloaded,
    RequestOutput,
    RequestParams,
    Unavailable,
)
from moray.jobs.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidBody,
    error_body,
    new_id,
    now,
    parse_request,
    usage,
)

DEFAULT_MAX_REQUEST_BYTES = 8 << 20


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> Response:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        # ASCII JSON: a message quoting the client's text stays encodable even with lone surrogates
        body = json.dumps(error_body(self.message, self.type, self.param, self.code))
        return Response(body, self.status, headers=headers, media_type="application/json")


# Each engine refusal's HTTP status, OpenAI error type and code, by the refusal's type.
REFUSALS: dict[type[EngineError], tuple[int, str, str | None]] = {
    Overloaded: (429, "rate_limit_error", "overloaded"),
    ContextLengthExceeded: (400, "invalid_request_error", "context_length_exceeded"),
    CacheTooSmall: (400, "invalid_request_error", "context_length_exceeded"),
    Unavailable: (503, "service_unavailable_error", "unavailable"),
}


def refusal(e: EngineError, param: str | None) -> APIError:
    status, type_, code = REFUSALS.get(type(e), (400, "invalid_request_error", None))
    if isinstance(e, Overloaded):
        return APIError(status, f"The server is overloaded: {e}. Retry later.", type_, None, code)
    if isinstance(e, Unavailable):
        return APIError(status, f"The model is temporarily unavailable: {e}. Retry later.", type_, None, code)
    return APIError(status, str(e), type_, param, code)


class OpenAIServer:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        api_keys: list[str] | tuple[str, ...] = (),
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        self.engine = engine
        self.model_name = model_name
        self.api_keys = [k for k in api_keys if k]
        self.max_request_bytes = max_request_bytes
        self.tokenizer = engine.engine.tokenizer
        self.created = now()

    # ------------------------------------------------------------ helpers
    def authorized(self, header: str) -> bool:
        """Whether an `Authorization` value (HTTP header or gRPC metadata) carries one of the keys."""
        if not self.api_keys:
            return True
        key = header[7:] if header.lower().startswith("bearer ") else ""
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys)

    def check_auth(self, request: Request) -> None:
        if not self.authorized(request.headers.get("authorization", "")):
            raise APIError(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )

    async def read(self, request: Request, model):
        """The request body as `model`: the API key first (401 beats any complaint about the body),
        then the size limit (413, before the body is read), then the JSON and its fields (400)."""
        self.check_auth(request)
        too_large = APIError(
            413, f"The request body is larger than this server's limit of {self.max_request_bytes} bytes.",
            "invalid_request_error", None, "request_too_large",
        )  # fmt: skip
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body says no length up front
            size += len(chunk)
            if size > self.max_request_bytes:
                raise too_large
            chunks.append(chunk)
        try:
            return parse_request(b"".join(chunks), model)
        except InvalidBody as e:
            raise APIError(400, str(e), param=e.param) from None

    async def encode(self, text: str, param: str) -> list[int]:
        try:
            # On a thread: a tokenizer that lets go of the GIL then leaves the event loop (health
            # checks, other requests) free. The engine refuses text too long to fit before tokenizing.
            return await asyncio.to_thread(self.engine.engine.encode, text)
        except EngineError as e:
            raise refusal(e, param) from e

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found"
            )

    def params(self, req, max_tokens: int | None, logprobs: int | None) -> RequestParams:
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        if req.stop_list and self.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer; this model has none", param="stop")
        seed = None if req.seed is None else req.seed % (1 << 63)
        return RequestParams(
            max_tokens=max_tokens if max_tokens is not None else 16,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=seed,
            stop=req.stop_list,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )

    def add(self, prompt_ids: list[int], params: RequestParams, param: str):
        try:
            return self.engine.add(prompt_ids, params)
        except EngineError as e:
            raise refusal(e, param) from e

    def default_max_tokens(self, n_prompt: int, asked: int | None, default: int | None = 16) -> int:
        """OpenAI's defaults: 16 for completions, the rest of the context for chat (default None)."""
        if asked is not None:
            return asked
        e = self.engine.engine
        room = min(e.max_context, e.pool.capacity_blocks * e.pool.block_size) - n_prompt
        return max(1, room if default is None else min(default, room))

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t]) if self.tokenizer is not None else str(t)

    def token_logprobs(self, outs: list[RequestOutput]) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """(token text, logprob, [(text, logprob) of the top alternatives]) for every token of `outs`;
        each endpoint lays these out in its own OpenAI shape."""
        return [
            (self.token_text(lp.token_id), lp.logprob, [(self.token_text(t), v) for t, v in lp.top])
            for o in outs
            for lp in o.logprobs
        ]

    async def respond(self, req, n_prompt: int, stream, head: dict, choice, first_chunk: dict | None = None):
        """The one response path of both endpoints: the whole answer, or its SSE stream.

        `choice(outs, streaming)` shapes the choice object for a list of engine outputs (all of
        them, or one per streamed chunk); `head` is the response's id/object/created/model;
        `first_chunk` opens a stream (chat's assistant role)."""
        if not req.stream:
            outs = [o async for o in stream]
            return {
                **head, "choices": [choice(outs, False)],
                "usage": usage(n_prompt, outs[-1].num_output_tokens),
            }  # fmt: skip

        async def events() -> AsyncIterator[str]:
            if first_chunk is not None:
                yield _sse({**head, "choices": [first_chunk]})
            last = None
            try:
                async for o in stream:
                    last = o
                    if not (o.new_text or o.finished or o.logprobs or self.tokenizer is None):
                        continue  # text held back (a possible stop string or a partial character)
                    yield _sse({**head, "choices": [choice([o], True)]})
            except (
                EngineError
            ) as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
                error = refusal(e, None)
                yield _sse(error_body(error.message, error.type, error.param, error.code))
                return
            if req.stream_options and req.stream_options.include_usage and last is not None:
                yield _sse({**head, "choices": [], "usage": usage(n_prompt, last.num_output_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # ------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest):
        self.check_model(req.model)
        prompt = (
            req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(
                    400, "this model has no tokenizer: send the prompt as token ids", param="prompt"
                )
            ids = await self.encode(prompt, "prompt")
        else:
            ids = list(prompt)
        max_tokens = self.default_max_tokens(len(ids), req.max_tokens)
        rid, q = self.add(ids, self.params(req, max_tokens, req.logprobs), "prompt")

        def choice(outs: list[RequestOutput], streaming: bool) -> dict:
            c = {
                "index": 0,
                "text": "".join(o.new_text for o in outs),
                "logprobs": None,
                "finish_reason": outs[-1].finish_reason,
            }
            if req.logprobs is not None:
                lps = self.token_logprobs(outs)
                c["logprobs"] = {
                    "tokens": [t for t, _, _ in lps],
                    "token_logprobs": [v for _, v, _ in lps],
                    "top_logprobs": [dict(top) for _, _, top in lps],
                    "text_offset": [],
                }
            if self.tokenizer is None:  # no text to show: the tokens themselves
                c["token_ids"] = [t for o in outs for t in o.new_token_ids]
            return c

        head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model_name}
        return await self.respond(req, len(ids), self.engine.stream(rid, q), head, choice)

    # ------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest):
        self.check_model(req.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer and chat template", param="messages")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text} for m in req.messages])
        ids = await self.encode(text, "messages")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req, self.default_max_tokens(len(ids), asked, None), logprobs)
        rid, q = self.add(ids, params, "messages")

        def choice(outs: list[RequestOutput], streaming: bool) -> dict:
            text = "".join(o.new_text for o in outs)
            if streaming:
                c = {"index": 0, "delta": {"content": text} if text else {}}
            else:
                c = {"index": 0, "message": {"role": "assistant", "content": text}}
            c["logprobs"] = None
            if req.logprobs:
                c["logprobs"] = {
                    "content": [
                        {
                            "token": t, "logprob": v, "bytes": list(t.encode()),
                            "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in top],
                        }
                        for t, v, top in self.token_logprobs(outs)
                    ]
                }  # fmt: skip
            c["finish_reason"] = outs[-1].finish_reason
            return c

        head = {"id": new_id("chatcmpl"), "created": now(), "model": self.model_name}
        head["object"] = "chat.completion.chunk" if req.stream else "chat.completion"
        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return await self.respond(req, len(ids), self.engine.stream(rid, q), head, choice, opening)

    # ------------------------------------------------------------ the app
    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "moray"}
        return {"object": "list", "data": [card]}

    def health(self) -> dict:
        return {"status": "ok", **self.engine.stats()}

    def build_app(self) -> FastAPI:
        app = FastAPI(title="moray", version="0.1.0")
        server = self

        @app.exception_handler(APIError)
        async def _api_error(request, exc: APIError):
            return exc.response()

        @app.exception_handler(StarletteHTTPException)
        async def _http(request, exc: StarletteHTTPException):
            type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return APIError(exc.status_code, str(exc.detail), type_).response()

        @app.exception_handler(EngineError)
        async def _engine_error(request, exc: EngineError):  # raised mid-request (Unavailable)
            return refusal(exc, None).response()

        @app.exception_handler(Exception)
        async def _internal(request, exc: Exception):
            return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

        @app.get("/health")
        async def health():
            return server.health()

        @app.get("/v1/models")
        async def models(request: Request):
            server.check_auth(request)
            return server.models()

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await server.completions(await server.read(request, CompletionRequest))

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await server.chat(await server.read(request, ChatCompletionRequest))

        return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
