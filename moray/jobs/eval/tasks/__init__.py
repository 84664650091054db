"""The evaluation tasks. Each is one module with a `Task`: the data files it reads (under the data
directory, `../shared/data/eval` by default), how it loads documents, the requests each document
makes (`moray.jobs.eval.requests`) and how the answers become metrics, all as lm-evaluation-harness
0.4 defines the task (its YAML named in each module), so the numbers compare with lm-eval's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from moray.jobs.eval.requests import Request


@dataclass
class TaskResult:
    metrics: dict[str, float]  # what is logged: name -> value
    samples: list[dict]  # one per document: its inputs, answers and scores
    extra: dict | None = None  # breakdowns (MMLU's subjects)


class Task(Protocol):
    name: str
    kind: str  # "loglikelihood" (needs the model's probabilities) or "generate"
    files: tuple[str, ...]  # paths under the data directory this task reads

    def load(self, data_dir: Path, limit: int | None) -> list[dict]: ...

    def requests(self, doc: dict) -> list[Request]: ...

    def score(self, docs: list[dict], answers: list[list]) -> TaskResult: ...


def registry() -> dict[str, Task]:
    from moray.jobs.eval.tasks import gsm8k, humaneval, mmlu, wikitext

    return {t.name: t for t in (wikitext.Wikitext(), mmlu.MMLU(), gsm8k.GSM8K(), humaneval.HumanEval())}


TASK_NAMES = ("wikitext", "mmlu", "gsm8k", "humaneval")
