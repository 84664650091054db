"""HumanEval, pass@k: lm-eval's `humaneval` (lm_eval/tasks/humaneval/humaneval.yaml) with the
unbiased pass@k estimator of Chen et al. (2021). The completion is cut at the first new top-level
statement; prompt + completion + the problem's tests then run in the sandbox
(`moray.platform.sandbox`): another process, time and memory limits, no network."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

from moray.jobs.eval.requests import Generate
from moray.jobs.eval.tasks import TaskResult

FILE = "humaneval.jsonl.gz"
UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "test", "entry_point")


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn from n, c of them correct, passes): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


class HumanEval:
    name = "humaneval"
    kind = "generate"
    files = (FILE,)
    max_tokens = 512  # lm-eval allows 1024; HumanEval's solutions are far shorter

    def __init__(self, samples: int = 1, k: tuple[int, ...] = (1,), temperature: float = 0.0, limits=None):
        self.samples, self.k, self.temperature, self.limits = samples, k, temperature, limits

    def load(self, data_dir: Path, limit: int | None) -> list[dict]:
        docs = []
        with gzip.open(Path(data_dir) / FILE, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and len(docs) >= limit:
                    break
                doc = json.loads(line)
                if missing := [k for k in FIELDS if k not in doc]:
                    raise ValueError(f"{FILE}, line {i + 1}: missing {', '.join(missing)}")
                docs.append(doc)
        return docs

    def requests(self, doc: dict) -> list:
        return [Generate(doc["prompt"], UNTIL, self.max_tokens, self.samples, self.temperature, seed=0)]

    # pass@k is named pass_at_k: MLflow refuses "@" in metric names
    def score(self, docs: list[dict], answers: list[list]) -> TaskResult:
        from moray.platform.sandbox import SandboxLimits, run_programs

        programs = [program(doc, c) for doc, (completions,) in zip(docs, answers) for c in completions]
        results = iter(run_programs(programs, self.limits or SandboxLimits()))
        samples = []
        for doc, (completions,) in zip(docs, answers):
            runs = [next(results) for _ in completions]
            samples.append(
                {
                    "task_id": doc["task_id"],
                    "completions": completions,
                    "status": [r.status for r in runs],
                    "detail": [r.detail for r in runs],
                    "passed": sum(r.passed for r in runs),
                }
            )
        n = max(len(samples), 1)
        metrics = {
            f"pass_at_{k}": sum(pass_at_k(len(s["completions"]), s["passed"], k) for s in samples) / n
            for k in self.k
        }
        metrics["problems"] = len(samples)
        return TaskResult(metrics, samples)
