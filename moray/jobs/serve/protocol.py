"""OpenAI-compatible request and response bodies (the subset moray serves).

Requests are strict: unknown fields, wrong types, out-of-range values and text that is not valid
Unicode are a 400 with OpenAI's error body, never a 500; `parse_request` turns a body into a request
or into an error message that names the field and the rule it broke."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
)

MAX_TOKENS_CAP = 1 << 20  # anything above is refused outright (the context check comes later)


def _unicode_text(s: str) -> str:
    # JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer (nor UTF-8) accepts
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"holds a lone UTF-16 surrogate ({s[e.start]!r} at character {e.start}), which is not valid text"
        ) from None
    return s


Text = Annotated[StrictStr, AfterValidator(_unicode_text)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: StrictBool = False


Float = Annotated[float, Field(allow_inf_nan=False)]


class _Sampling(Strict):
    model: Text
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=1 << 20)] | None = None  # vLLM's extension; -1/0: off
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(1 << 63), lt=1 << 63)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None  # accepted, not applied
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None  # accepted, not applied
    user: Text | None = None
    ignore_eos: StrictBool = False  # vLLM's extension (benchmarks)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def _prompt_shape(v: Any) -> str | None:
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "one string in a list" if v and isinstance(v[0], str) else "token ids"
    return None


class CompletionRequest(_Sampling):
    prompt: Annotated[
        Annotated[Text, Tag("a string")]
        | Annotated[list[StrictInt], Field(min_length=1), Tag("token ids")]
        | Annotated[list[Text], Field(min_length=1, max_length=1), Tag("one string in a list")],
        # by shape, so a bad prompt is told what its own shape broke (not every member's complaint)
        Discriminator(
            _prompt_shape,
            custom_error_type="prompt_shape",
            custom_error_message="expected a string, an array of token ids or an array of one string",
        ),
    ]
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: Literal[False] = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, str) and not v or isinstance(v, list) and isinstance(v[0], str) and not v[0]:
            raise ValueError("must not be empty")
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: Text | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class InvalidBody(ValueError):
    """A request body that is not JSON, or not a valid request; `param` is the field, if one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


RequestT = TypeVar("RequestT", bound=Strict)
_FIELDS = {
    f
    for m in (CompletionRequest, ChatCompletionRequest, Message, TextPart, StreamOptions)
    for f in m.model_fields
}
_JSON_TYPES = {
    str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
    dict: "an object", type(None): "null",
}  # fmt: skip
# pydantic's type mismatches, by what the field expected
_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "bool_type": "a boolean", "float_type": "a number",
    "list_type": "an array", "dict_type": "an object", "model_type": "an object",
    "model_attributes_type": "an object",
}  # fmt: skip


def parse_request(body: bytes, model: type[RequestT]) -> RequestT:
    """The request in `body`, or InvalidBody whose message names the field and the rule."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidBody("We could not parse the JSON body of your request: it is not UTF-8 text.") from None
    except json.JSONDecodeError as e:
        raise InvalidBody(
            f"We could not parse the JSON body of your request: {e.msg} (line {e.lineno}, column {e.colno})."
        ) from None
    if not isinstance(data, dict):
        raise InvalidBody(f"The request body must be a JSON object, not {_json_type(data)}.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _explain(e)
        raise InvalidBody(message, param) from None


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _explain(exc: ValidationError) -> tuple[str, str]:
    """One message for the first field in error. A union (prompt: text | token ids) fails once per
    member; the member whose shape matched broke a rule, so its error is the one to tell, and when
    none matched the message lists what the field accepts."""
    errors = []
    for e in exc.errors(include_url=False):
        last = len(e["loc"]) - 1  # an unknown field's own name is kept; union member tags are not
        loc = [
            x for i, x in enumerate(e["loc"])
            if isinstance(x, int) or x in _FIELDS or (e["type"] == "extra_forbidden" and i == last)
        ]  # fmt: skip
        errors.append((".".join(map(str, loc)), e))
    first = errors[0][0].split(".")[0]
    mine = [(p, e) for p, e in errors if p.split(".")[0] == first]
    broke_a_rule = [(p, e) for p, e in mine if e["type"] not in _EXPECTED]
    if broke_a_rule:
        param, e = broke_a_rule[0]
        return f"{param}: {_rule(e)}", param
    param = mine[0][0]
    accepted = dict.fromkeys(_EXPECTED[e["type"]] for p, e in mine if p == param)
    return f"{param}: expected {' or '.join(accepted)}, got {_json_type(mine[0][1]['input'])}", param


def _rule(e: dict) -> str:
    t, ctx = e["type"], e.get("ctx", {})
    if t == "missing":
        return "is required"
    if t == "extra_forbidden":
        return "is not a known parameter"
    if t == "too_long":
        return f"at most {ctx['max_length']} item(s), got {ctx['actual_length']}"
    if t == "too_short":
        return f"at least {ctx['min_length']} item(s), got {ctx['actual_length']}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if t in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[t]} {limit}, got {e['input']!r}"
    if t == "finite_number":
        return "must be a finite number"
    if t == "literal_error":
        return f"must be {ctx['expected']}"
    if t == "none_required":
        return "is not supported (must be null or absent)"
    if t in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return e["msg"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
