"""The evaluation job: documents -> requests -> tokens (lm-eval's rules) -> Ray actors holding the
model -> answers -> metrics, logged to MLflow.

Against model files, the requests fan out over `workers` Ray actors (`Scorer`), each holding the
model: log-likelihood inputs are dealt out longest first, so every actor gets a like share of the
work, with the inputs that are the same (one MMLU question's four answers) on one actor. Against an
endpoint, the generation tasks go through the deployment's OpenAI API instead.

Results go to the model's MLflow run (for a registered model, the run that produced it; its version
also gets the figures as tags) or to a run of the `moray-eval` experiment, and to a JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path

from moray.jobs.eval.config import EvalConfig
from moray.jobs.eval.requests import Loglikelihood, Rolling, encode_pair, rolling_windows
from moray.jobs.eval.tasks import Task, registry

EXPERIMENT = "moray-eval"


def build_tasks(config: EvalConfig) -> dict[str, Task]:
    from moray.jobs.eval.tasks.humaneval import HumanEval
    from moray.platform.sandbox import SandboxLimits

    tasks = registry()
    tasks["humaneval"] = HumanEval(
        config.samples,
        config.k,
        config.temperature if config.samples > 1 else 0.0,
        SandboxLimits(config.sandbox_timeout_s, config.sandbox_memory_mb),
    )
    for name, n in config.max_gen_tokens.items():
        tasks[name].max_tokens = n
    return {name: tasks[name] for name in config.tasks}


class TokenRules:
    """lm-eval's tokenization for one model directory: the tokenizer as `AutoTokenizer` applies it
    (special tokens as its post-processor adds them), bos (else eos) before a text's first token, and
    the model's context as the window."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        cfg = json.loads((model_dir / "config.json").read_text())
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.max_length = int(cfg["max_position_embeddings"])
        bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
        self.prefix = bos if bos is not None else (eos[0] if isinstance(eos, list) else eos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def tokens(self, req) -> list[tuple]:
        """A request as the scorer's items: ("ll", ctx, cont) pairs, or one ("gen", prompt, params)."""
        if isinstance(req, Loglikelihood):
            ctx, cont = encode_pair(self.encode, req.context, req.continuation)
            return [("ll", ctx or [self.prefix], cont)]
        if isinstance(req, Rolling):
            return [
                ("ll", c, p) for c, p in rolling_windows(self.encode(req.text), self.prefix, self.max_length)
            ]
        prompt = self.encode(req.prompt)[-(self.max_length - req.max_tokens) :]  # lm-eval keeps the end
        params = {"until": req.until, "max_tokens": req.max_tokens, "n": req.n, "temperature": req.temperature,
                  "seed": req.seed}  # fmt: skip
        return [("gen", prompt, params)]


def answer(req, items: list[tuple], results: list):
    """A request's answer from its items' results, in the task's shape."""
    if isinstance(req, Loglikelihood):
        return results[0]
    if isinstance(req, Rolling):
        return (sum(ll for ll, _ in results), sum(len(it[2]) for it in items))
    return results[0]


def deal(items: list[tuple], workers: int) -> list[list[int]]:
    """Item indices per worker: log-likelihood inputs longest first, dealt round-robin, the items of
    one input together; generations round-robin."""
    by_input: dict[tuple, list[int]] = {}
    gens = []
    for i, it in enumerate(items):
        if it[0] == "ll":
            by_input.setdefault(tuple(it[1] + it[2][:-1]), []).append(i)
        else:
            gens.append(i)
    shares: list[list[int]] = [[] for _ in range(workers)]
    for n, key in enumerate(sorted(by_input, key=len, reverse=True)):
        shares[n % workers].extend(by_input[key])
    for n, i in enumerate(gens):
        shares[n % workers].append(i)
    return shares


def score_with_model(config: EvalConfig, model_dir: Path, items: list[tuple]) -> list:
    """Every item's result, from `workers` Ray actors holding the model."""
    import ray

    from moray.jobs.eval.scorer import Scorer
    from moray.platform.cluster import connect

    connect()
    threads = config.threads or max(1, int(config.cpus_per_worker))
    # OpenMP sizes its thread team from OMP_NUM_THREADS at start (Ray sets it to num_cpus): a team
    # of 1 widened later by set_num_threads runs about 20% slower than one started at its size.
    env = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    actor = ray.remote(num_cpus=config.cpus_per_worker, runtime_env=env)(Scorer)
    workers = [actor.remote(str(model_dir), threads, config.max_batch_tokens) for _ in range(config.workers)]
    shares = deal(items, config.workers)
    calls = []
    for w, share in zip(workers, shares):
        ll = [i for i in share if items[i][0] == "ll"]
        gen = [i for i in share if items[i][0] == "gen"]
        if ll:
            calls.append((ll, w.loglikelihood.remote([(items[i][1], items[i][2]) for i in ll])))
        if gen:
            calls.append((gen, w.generate.remote([(items[i][1], items[i][2]) for i in gen])))
    results: list = [None] * len(items)
    try:
        for idx, ref in calls:
            for i, r in zip(idx, ray.get(ref)):
                results[i] = r
    finally:
        for w in workers:
            ray.kill(w)
    return results


def score_locally(scorer, items: list[tuple]) -> list:
    """Every item's result from a Scorer in this process (tests, and what each actor does with its share)."""
    results: list = [None] * len(items)
    ll = [i for i, it in enumerate(items) if it[0] == "ll"]
    gen = [i for i, it in enumerate(items) if it[0] == "gen"]
    for idx, out in ((ll, scorer.loglikelihood([items[i][1:] for i in ll]) if ll else []),
                     (gen, scorer.generate([items[i][1:] for i in gen]) if gen else [])):  # fmt: skip
        for i, r in zip(idx, out):
            results[i] = r
    return results


def evaluate(config: EvalConfig, model_dir: Path | None = None, endpoint=None, scorer=None) -> dict:
    """Run the tasks once: against the model files on Ray actors (or `scorer`, one in this process),
    or the generation tasks against `endpoint`. The results: metrics per task, samples, timings."""
    t0 = time.perf_counter()
    tasks = build_tasks(config)
    docs = {name: task.load(config.data_dir, config.limit) for name, task in tasks.items()}
    if endpoint is not None:
        out = evaluate_docs(tasks, docs, None, None, endpoint)
    elif scorer is not None:
        out = evaluate_docs(tasks, docs, TokenRules(model_dir), lambda items: score_locally(scorer, items))
    else:
        out = evaluate_docs(
            tasks, docs, TokenRules(model_dir), lambda items: score_with_model(config, model_dir, items)
        )
    out["seconds"]["total"] = time.perf_counter() - t0
    return out


def evaluate_docs(tasks: dict[str, Task], docs: dict[str, list[dict]], rules, score, endpoint=None) -> dict:
    """The tasks on these documents: every request tokenized by `rules` and answered by one call of
    `score` (items -> results), so all tasks share the workers' batches; or sent to `endpoint`."""
    out: dict = {"tasks": {}, "samples": {}, "seconds": {}}
    if endpoint is not None:
        for name, task in tasks.items():
            t0 = time.perf_counter()
            reqs = [task.requests(d) for d in docs[name]]
            it = iter(endpoint.generate([r for rs in reqs for r in rs]))
            result = task.score(docs[name], [[next(it) for _ in rs] for rs in reqs])
            result.metrics["refused_requests"] = len(endpoint.refused)  # scored as empty completions
            _collect(out, name, result, time.perf_counter() - t0)
        return out
    items: list[tuple] = []
    plan = {}  # task -> per doc: per request: (request, its items' indices)
    for name, task in tasks.items():
        plan[name] = []
        for doc in docs[name]:
            reqs = []
            for req in task.requests(doc):
                its = rules.tokens(req)
                reqs.append((req, range(len(items), len(items) + len(its))))
                items.extend(its)
            plan[name].append(reqs)
    t0 = time.perf_counter()
    results = score(items)
    out["seconds"]["model"] = time.perf_counter() - t0
    for name, task in tasks.items():
        t1 = time.perf_counter()
        answers = [[answer(req, [items[i] for i in idx], [results[i] for i in idx]) for req, idx in reqs]
                   for reqs in plan[name]]  # fmt: skip
        _collect(out, name, task.score(docs[name], answers), time.perf_counter() - t1)
    return out


def _collect(out: dict, name: str, result, seconds: float) -> None:
    out["tasks"][name] = dict(result.metrics, **(result.extra or {}))
    out["samples"][name] = result.samples
    out["seconds"][name] = seconds


def metrics_of(results: dict) -> dict[str, float]:
    """The figures as flat MLflow metric names: eval/<task>/<metric>."""
    flat = {}
    for task, metrics in results["tasks"].items():
        for name, value in metrics.items():
            if isinstance(value, int | float):
                flat[f"eval/{task}/{name}"] = float(value)
    return flat


# ------------------------------------------------------------------------------------------ MLflow
def log_results(config: EvalConfig, results: dict, run_id: str | None = None, step: int = 0) -> dict:
    """Log the figures (and the results file) to MLflow. A registered model's figures go to the run
    that produced it and onto its version as tags; anything else (an HF directory, an endpoint) to
    `run_id`, or a new run of the moray-eval experiment. Returns {run_id, model_version}."""
    import tempfile

    from mlflow import MlflowClient

    from moray.platform.registry import model_version
    from moray.platform.tracking import setup_mlflow, tracking_uri

    mlflow = setup_mlflow(EXPERIMENT)
    if config.tracking_uri:
        mlflow.set_tracking_uri(config.tracking_uri)
    client = MlflowClient(config.tracking_uri or tracking_uri())
    metrics = metrics_of(results)
    version = None
    if run_id is None and config.model and config.model.startswith("models:/"):
        version = model_version(client, config.model)
        run_id = version.run_id
    if run_id is None:
        target = config.model or config.endpoint
        run = client.create_run(
            mlflow.get_experiment_by_name(EXPERIMENT).experiment_id,
            run_name=config.run_name or f"eval {Path(target).name if config.model else target}",
            tags={"moray.kind": "evaluation", "moray.eval.target": str(target)},
        )
        run_id = run.info.run_id
        client.log_param(run_id, "tasks", ",".join(config.tasks))
        client.log_param(run_id, "limit", str(config.limit))
    stamp = int(time.time() * 1000)
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{step}.json"
        path.write_text(json.dumps(results, indent=1, default=str))
        client.log_artifact(run_id, str(path), artifact_path="eval")
    if version is not None:
        for k, v in metrics.items():
            client.set_model_version_tag(version.name, version.version, k.replace("/", "."), f"{v:.6g}")
        client.set_model_version_tag(version.name, version.version, "eval.tasks", ",".join(config.tasks))
        client.set_model_version_tag(version.name, version.version, "eval.limit", str(config.limit))
    return {
        "run_id": run_id,
        "model_version": None if version is None else f"{version.name}/{version.version}",
    }


# --------------------------------------------------------------------------------------- the job
def prepare(config: EvalConfig):
    """Everything checked and at hand before Ray starts: (local model directory, endpoint)."""
    from moray.jobs.eval.endpoint import Endpoint
    from moray.jobs.serve.loading import check_model_source, resolve_model

    config.check()
    if config.endpoint is not None:
        endpoint = Endpoint(config.endpoint, config.served_model, config.api_key)
        endpoint.check()
        return None, endpoint
    check_model_source(config.model, config.tracking_uri)
    model_dir = resolve_model(config.model, config.tracking_uri)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"model {config.model!r}: no tokenizer.json in {model_dir} (export it with its tokenizer)"
        )
    return model_dir, None


def run(config: EvalConfig, on_round=None) -> dict:
    """Check, evaluate, log and write the results; with `every_s`, evaluate the endpoint again every
    so many seconds (each round one step of the same MLflow run, and the gauges Prometheus scrapes)."""
    model_dir, endpoint = prepare(config)
    run_id, round_ = None, 0
    while True:
        results = evaluate(config, model_dir, endpoint)
        results["model"] = config.model or config.endpoint
        if config.mlflow:
            results["mlflow"] = log_results(config, results, run_id, step=round_)
            run_id = results["mlflow"]["run_id"] if config.every_s else None
        if config.every_s is not None:
            publish_gauges(results, str(results["model"]))
        if config.output:
            Path(config.output).parent.mkdir(parents=True, exist_ok=True)
            Path(config.output).write_text(json.dumps(results, indent=1, default=str))
        if on_round is not None:
            on_round(results)
        round_ += 1
        if config.every_s is None or (config.rounds is not None and round_ >= config.rounds):
            return results
        time.sleep(config.every_s)


_GAUGE = None


def publish_gauges(results: dict, target: str) -> None:
    """moray_eval_score{task, metric, target}: the latest figures of a watched deployment, for the
    serving dashboard's accuracy panel (through Ray's metrics agent, as the engine's metrics)."""
    global _GAUGE
    from moray.platform.cluster import connect

    connect()
    from ray.util.metrics import Gauge

    if _GAUGE is None:
        _GAUGE = Gauge(
            "moray_eval_score", "latest scheduled evaluation figure", tag_keys=("task", "metric", "target")
        )
    for task, metrics in results["tasks"].items():
        for name, value in metrics.items():
            if isinstance(value, int | float):
                _GAUGE.set(float(value), tags={"task": task, "metric": name, "target": target})
