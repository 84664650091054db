"""The evaluation job's settings and every check on them, done before Ray starts: an unknown task,
a missing data file, a model without a tokenizer and an endpoint that does not answer are each
refused with what was wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moray.jobs.eval.tasks import TASK_NAMES

DEFAULT_DATA = Path("../shared/data/eval")  # relative to where the job runs (the repo root in `make`)


@dataclass
class EvalConfig:
    model: str | None = None  # an HF directory, models:/NAME/VERSION or models:/NAME@ALIAS
    endpoint: str | None = None  # a deployment's OpenAI API base URL (…/v1): the generation tasks
    served_model: str | None = None  # the endpoint's model name (default: the first it lists)
    tasks: tuple[str, ...] = TASK_NAMES
    limit: int | None = None  # documents per task (MMLU: questions per subject)
    output: Path | None = None  # results JSON, with every sample
    data_dir: Path = DEFAULT_DATA
    workers: int = 1  # Ray actors the requests fan out over, each holding the model
    cpus_per_worker: float = 1.0
    threads: int | None = None  # torch threads per worker (default: the machine's cores / workers)
    max_batch_tokens: int = 8192  # padded tokens per log-likelihood forward
    samples: int = 1  # HumanEval completions per problem (temperature sampling when > 1)
    k: tuple[int, ...] = (1,)  # HumanEval pass@k
    temperature: float = 0.8  # HumanEval's sampling temperature when samples > 1
    max_gen_tokens: dict[str, int] = field(default_factory=dict)  # task -> new tokens (default: the task's)
    sandbox_timeout_s: float = 10.0
    sandbox_memory_mb: int = 1024
    tracking_uri: str | None = None
    mlflow: bool = True  # log results to the model's run (and its registered version's tags)
    run_name: str | None = None  # the MLflow run for a model that has none (a plain HF directory)
    api_key: str | None = None
    every_s: float | None = None  # evaluate the endpoint again every so many seconds (drift watch)
    rounds: int | None = None  # with every_s: stop after so many rounds (default: run until stopped)

    def check(self) -> None:
        """ValueError or FileNotFoundError naming the first thing wrong."""
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("give exactly one of --model (the model's files) and --endpoint (a deployment)")
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown or not self.tasks:
            raise ValueError(
                f"unknown task {', '.join(unknown) or '(none given)'}: the tasks are {', '.join(TASK_NAMES)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a task is named twice in {','.join(self.tasks)}")
        if self.endpoint is not None:
            needs_model = [t for t in self.tasks if t in ("wikitext", "mmlu")]
            if needs_model:
                raise ValueError(
                    f"{', '.join(needs_model)} score the model's log-likelihoods, which an OpenAI endpoint does "
                    "not return: run them with --model"
                )
        elif self.every_s is not None:
            raise ValueError("--every watches a deployment: it needs --endpoint")
        for name, value, low in (("limit", self.limit, 1), ("workers", self.workers, 1), ("samples", self.samples, 1),
                                 ("max_batch_tokens", self.max_batch_tokens, 1), ("rounds", self.rounds, 1)):  # fmt: skip
            if value is not None and value < low:
                raise ValueError(f"{name}={value}: must be at least {low}")
        if self.cpus_per_worker <= 0 or (self.every_s is not None and self.every_s <= 0):
            raise ValueError("cpus_per_worker and every must be positive")
        if any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"pass@k needs 1 <= k <= samples ({self.samples}); got k={list(self.k)}")
        for task, n in self.max_gen_tokens.items():
            if task not in ("gsm8k", "humaneval") or n < 1:
                raise ValueError(
                    f"max_gen_tokens {task}={n}: only gsm8k and humaneval generate, at least 1 token"
                )
        self.check_data()

    def check_data(self) -> None:
        from moray.jobs.eval.tasks import registry

        tasks = registry()
        for name in self.tasks:
            for rel in tasks[name].files:
                path = Path(self.data_dir) / rel
                if not path.exists():
                    raise FileNotFoundError(
                        f"task {name}: {path} does not exist (--data-dir points at the evaluation sets, "
                        f"default {DEFAULT_DATA})"
                    )
