"""The OpenAI-compatible HTTP API over an `AsyncEngine`, as a FastAPI app.

`OpenAIServer` is plain Python (no Serve): the Serve deployment in app.py holds one, and tests
can drive its FastAPI app in-process."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moray.actors.engine import AsyncEngine, EngineError, Overloaded, RequestParams
from moray.jobs.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code), self.status, headers=headers
        )


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, model_name: str, api_keys: list[str] | tuple[str, ...] = ()):
        self.engine = engine
        self.model_name = model_name
        self.api_keys = [k for k in api_keys if k]
        self.tokenizer = engine.engine.tokenizer
        self.created = now()

    # ------------------------------------------------------------ helpers
    def check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        key = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys):
            raise APIError(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )

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
        if params.max_tokens is None:
            params.max_tokens = 16
        try:
            return self.engine.add(prompt_ids, params)
        except Overloaded as e:
            raise APIError(
                429, f"The server is overloaded: {e}. Retry later.", "rate_limit_error", None, "overloaded"
            ) from e
        except EngineError as e:
            code = "context_length_exceeded" if "context" in str(e) or "KV cache" in str(e) else None
            raise APIError(400, str(e), "invalid_request_error", param, code) from e

    def default_max_tokens(self, n_prompt: int, asked: int | None, default: int | None = 16) -> int:
        """OpenAI's defaults: 16 for completions, the rest of the context for chat (default None)."""
        if asked is not None:
            return asked
        e = self.engine.engine
        room = min(e.max_context, e.pool.capacity_blocks * e.pool.block_size) - n_prompt
        return max(1, room if default is None else min(default, room))

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t]) if self.tokenizer is not None else str(t)

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
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        else:
            ids = list(prompt)
        max_tokens = self.default_max_tokens(len(ids), req.max_tokens)
        rid, q = self.add(ids, self.params(req, max_tokens, req.logprobs), "prompt")
        cid, created = new_id("cmpl"), now()
        stream = self.engine.stream(rid, q)

        def lp_block(outs) -> dict | None:
            if req.logprobs is None:
                return None
            lps = [lp for o in outs for lp in o.logprobs]
            return {
                "tokens": [self.token_text(lp.token_id) for lp in lps],
                "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps],
                "text_offset": [],
            }

        base = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name}
        if not req.stream:
            outs = [o async for o in stream]
            last = outs[-1]
            text = "".join(o.new_text for o in outs) if self.tokenizer else ""
            choice = {
                "index": 0,
                "text": text,
                "logprobs": lp_block(outs),
                "finish_reason": last.finish_reason,
            }
            if self.tokenizer is None:
                choice["token_ids"] = [t for o in outs for t in o.new_token_ids]
            return {**base, "choices": [choice], "usage": usage(len(ids), last.num_output_tokens)}

        async def events() -> AsyncIterator[str]:
            last = None
            async for o in stream:
                last = o
                if not o.new_text and not o.finished and req.logprobs is None and self.tokenizer is not None:
                    continue
                choice = {
                    "index": 0,
                    "text": o.new_text,
                    "logprobs": lp_block([o]),
                    "finish_reason": o.finish_reason,
                }
                yield _sse({**base, "choices": [choice]})
            if req.stream_options and req.stream_options.include_usage and last is not None:
                yield _sse({**base, "choices": [], "usage": usage(len(ids), last.num_output_tokens)})
            yield "data: [DONE]\n\n"

        return _streaming(events())

    # ------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest):
        self.check_model(req.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer and chat template", param="messages")
        text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text} for m in req.messages])
        ids = self.tokenizer.encode(text)
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        rid, q = self.add(
            ids, self.params(req, self.default_max_tokens(len(ids), asked, None), logprobs), "messages"
        )
        cid, created = new_id("chatcmpl"), now()
        stream = self.engine.stream(rid, q)

        def lp_block(outs) -> dict | None:
            if not req.logprobs:
                return None
            content = []
            for o in outs:
                for lp in o.logprobs:
                    tok = self.token_text(lp.token_id)
                    top = [
                        {
                            "token": self.token_text(t),
                            "logprob": v,
                            "bytes": list(self.token_text(t).encode()),
                        }
                        for t, v in lp.top
                    ]
                    content.append(
                        {
                            "token": tok,
                            "logprob": lp.logprob,
                            "bytes": list(tok.encode()),
                            "top_logprobs": top,
                        }
                    )
            return {"content": content}

        base = {"id": cid, "created": created, "model": self.model_name}
        if not req.stream:
            outs = [o async for o in stream]
            last = outs[-1]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(o.new_text for o in outs)},
                "logprobs": lp_block(outs),
                "finish_reason": last.finish_reason,
            }
            return {
                **base, "object": "chat.completion", "choices": [choice],
                "usage": usage(len(ids), last.num_output_tokens),
            }  # fmt: skip

        chunk = {**base, "object": "chat.completion.chunk"}

        async def events() -> AsyncIterator[str]:
            yield _sse(
                {
                    **chunk,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
            )
            last = None
            async for o in stream:
                last = o
                if not o.new_text and not o.finished and not o.logprobs:
                    continue  # text held back (a possible stop string or a partial character)
                delta = {"content": o.new_text} if o.new_text else {}
                c = {"index": 0, "delta": delta, "logprobs": lp_block([o]), "finish_reason": o.finish_reason}
                yield _sse({**chunk, "choices": [c]})
            if req.stream_options and req.stream_options.include_usage and last is not None:
                yield _sse({**chunk, "choices": [], "usage": usage(len(ids), last.num_output_tokens)})
            yield "data: [DONE]\n\n"

        return _streaming(events())

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

        @app.exception_handler(RequestValidationError)
        async def _invalid(request, exc: RequestValidationError):
            errs = exc.errors()
            first = errs[0] if errs else {}
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            msg = first.get("msg", "invalid request")
            if first.get("type") == "json_invalid" or loc == []:
                msg = "We could not parse the JSON body of your request."
            return APIError(
                400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", param=".".join(loc) or None
            ).response()

        @app.exception_handler(StarletteHTTPException)
        async def _http(request, exc: StarletteHTTPException):
            type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return APIError(exc.status_code, str(exc.detail), type_).response()

        @app.exception_handler(Exception)
        async def _internal(request, exc: Exception):
            return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

        @app.get("/health")
        async def health():
            return server.health()

        auth = [Depends(server.check_auth)]  # before the body is validated: 401 beats 400

        @app.get("/v1/models", dependencies=auth)
        async def models():
            return server.models()

        @app.post("/v1/completions", dependencies=auth)
        async def completions(body: CompletionRequest):
            return await server.completions(body)

        @app.post("/v1/chat/completions", dependencies=auth)
        async def chat(body: ChatCompletionRequest):
            return await server.chat(body)

        return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
