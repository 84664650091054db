"""The generation tasks against a running deployment: its OpenAI API (`/v1/completions`).

This is how a deployment is watched for accuracy drift: the same prompts as against the model files,
sent to what users are served. The OpenAI API allows 4 stop strings a request; all of a task's stop
strings are applied again here, so a task with more (HumanEval has 5) is cut where lm-eval cuts it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from moray.jobs.eval.requests import Generate


class EndpointError(RuntimeError):
    """The endpoint cannot be reached, or answered with an error (`status`: its HTTP status)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def cut(text: str, until: tuple[str, ...]) -> str:
    hits = [i for s in until if s and (i := text.find(s)) >= 0]
    return text[: min(hits)] if hits else text


class Endpoint:
    def __init__(
        self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("MORAY_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.model = model

    def _call(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        req = urllib.request.Request(
            self.base_url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise EndpointError(
                f"{self.base_url}{path}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}", e.code
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise EndpointError(f"{self.base_url} cannot be reached ({getattr(e, 'reason', e)})") from None

    def check(self) -> str:
        """The served model's name (the first listed, unless one was given); EndpointError if the
        endpoint does not answer `GET /models` or does not serve that model."""
        listed = [m["id"] for m in self._call("/models", timeout=10).get("data", [])]
        if self.model is None:
            if not listed:
                raise EndpointError(f"{self.base_url}/models lists no model")
            self.model = listed[0]
        elif self.model not in listed:
            raise EndpointError(f"{self.base_url} does not serve {self.model!r} (it serves {listed})")
        return self.model

    def complete(self, prompt: str, req: Generate, seed: int | None) -> str:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "stop": list(req.until[:4]),
        }
        if seed is not None:
            body["seed"] = seed
        out = self._call("/completions", body)
        return cut(out["choices"][0]["text"], req.until)

    def generate(self, items: list[Generate], concurrency: int = 8) -> list[list[str]]:
        """Each request's n completions (n calls with seeds seed, seed + 1, ...), `concurrency` at a
        time. A request the deployment refuses (a 4xx: a prompt longer than its context) scores as an
        empty completion and is counted in `self.refused`; anything else wrong stops the evaluation."""
        calls = [
            (i, r, None if r.seed is None else r.seed + j) for i, r in enumerate(items) for j in range(r.n)
        ]
        self.refused: list[str] = []

        def call(c) -> str:
            try:
                return self.complete(c[1].prompt, c[1], c[2])
            except EndpointError as e:
                if e.status is None or not 400 <= e.status < 500 or e.status in (401, 403, 404):
                    raise
                self.refused.append(str(e))
                return ""

        with ThreadPoolExecutor(concurrency) as pool:
            texts = list(pool.map(call, calls))
        out: list[list[str]] = [[] for _ in items]
        for (i, _, _), t in zip(calls, texts):
            out[i].append(t)
        return out
