"""Tokenizer and chat template for serving: a `tokenizer.json` (the `tokenizers` library) and a
Jinja chat template (from `tokenizer_config.json` / `chat_template.jinja` in the model directory,
else the model package's default), the stop ids of `generation_config.json`, plus incremental
detokenization for streaming."""

from __future__ import annotations

import json
from pathlib import Path

from moray.model.hf import DEFAULT_CHAT_TEMPLATE


class Tokenizer:
    def __init__(
        self,
        tokenizer,
        chat_template: str | None = None,
        eos_token_id: int | None = None,
        stop_token_ids: tuple[int, ...] = (),
    ):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self._tok = tokenizer  # tokenizers.Tokenizer
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self._template = env.from_string(self.chat_template)
        self.eos_token_id = eos_token_id
        # Every id generation ends at (eos first); what transformers' `generate` stops on.
        self.stop_token_ids = tuple(
            dict.fromkeys(([eos_token_id] if eos_token_id is not None else []) + list(stop_token_ids))
        )

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_id: int | None = None) -> Tokenizer:
        """eos_token_id: the model's (config.json); generation_config.json's eos ids join the stop
        ids, and give eos when none is passed."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
            t = cfg.get("chat_template")
            template = t if isinstance(t, str) else None
        stops = generation_stop_ids(path)
        if eos_token_id is None and stops:
            eos_token_id = stops[0]
        return cls(HFTokenizer.from_file(str(file)), template, eos_token_id, stops)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode holds it for the whole call), so a long prompt
        # tokenized in a worker thread leaves the replica's event loop free.
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def generation_stop_ids(path: str | Path) -> tuple[int, ...]:
    """The eos ids of a model directory's generation_config.json (an int or a list there), or ()."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return ()
    eos = json.loads(file.read_text()).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(int(i) for i in ids if i is not None)


class Detokenizer:
    """Text of a growing token list, handed out in deltas; holds back an incomplete UTF-8 tail and
    anything that could still turn into a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def update(self, ids: list[int], final: bool = False) -> str:
        """ids: all output tokens so far. Returns the new text to send (sets `stopped` when a stop
        string appears; the text then ends just before it)."""
        text = self.tok.decode(ids)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next bytes
        self.text = text
        hits = [i for s in self.stop if (i := text.find(s, max(0, self.sent - len(s)))) >= 0]
        if hits:
            self.text = text[: min(hits)]
            self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
