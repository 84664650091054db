"""Tokenizer and chat template for serving: a `tokenizer.json` (the `tokenizers` library) and a
Jinja chat template (from `tokenizer_config.json` / `chat_template.jinja` in the model directory,
else a plain default), plus incremental detokenization for streaming."""

from __future__ import annotations

import json
from pathlib import Path

# Used when the model directory has no template: role-tagged turns, then the assistant's cue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer:
    def __init__(self, tokenizer, chat_template: str | None = None, eos_token_id: int | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self._tok = tokenizer  # tokenizers.Tokenizer
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self._template = env.from_string(self.chat_template)
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_id: int | None = None) -> Tokenizer:
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
        return cls(HFTokenizer.from_file(str(file)), template, eos_token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)


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
