"""What a task asks of a model, in lm-evaluation-harness's three request kinds, and lm-eval's rules
for turning text into tokens (so moray's numbers and lm-eval's are computed on the same tokens)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loglikelihood:
    """log P(continuation | context), and whether greedy decoding would produce it."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Rolling:
    """log P(text), the whole text scored in windows of the model's context (perplexity)."""

    text: str


@dataclass(frozen=True)
class Generate:
    """n completions of prompt, each cut at the first of `until`."""

    prompt: str
    until: tuple[str, ...]
    max_tokens: int
    n: int = 1
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None


Request = Loglikelihood | Rolling | Generate


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation, the
    whole text is encoded once and split where the context's own encoding ends (so a token that
    spans the boundary counts as continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`: every token is
    predicted exactly once; the first window starts from `prefix_token` (bos, else eos), later ones
    carry the max_len tokens before them as context. Each item: (context, continuation) tokens."""
    if not tokens:
        return []
    out = []
    first = min(max_len, len(tokens))
    out.append(([prefix_token] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        window_in = tokens[end - max_len - 1 : end - 1]
        window_pred = tokens[end - n : end]
        out.append((window_in, window_pred))
        predicted += n
    # make_disjoint_window: the context is what the window input holds before the predicted tokens
    return [(inp[: len(inp) - len(pred) + 1], pred) for inp, pred in out]
