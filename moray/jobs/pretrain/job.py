"""The pre-training job driver: validate, connect, track, train on Ray Train, export, register.

`python -m moray.jobs.pretrain --config configs/pretrain/tiny.yaml --set train.max_steps=20`
(the same line under `ray job submit`), or `moray pretrain ...`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import posixpath
import sys
import tempfile
from pathlib import Path

from moray.jobs.pretrain.callbacks import Callback
from moray.jobs.pretrain.config import PretrainConfig, run_layout, validate
from moray.platform.config import ConfigError, apply_overrides, from_dict, load_yaml
from moray.platform.storage import Storage
from moray.platform.workdir import work_dir

log = logging.getLogger("moray.pretrain")


def load_config(path: str | None, overrides: list[str]) -> PretrainConfig:
    data = load_yaml(path) if path else {}
    return from_dict(PretrainConfig, apply_overrides(data, overrides))


CONFIG_ARTIFACT = "config.json"  # the run's resolved config, which --resume-from continues


def _mlflow_run(mlflow, cfg: PretrainConfig, params: dict, tags: dict, resume_run_id: str | None) -> str:
    """The run `--resume-from` named, else the unfinished MLflow run of this run name (a restarted
    run), else a new one with the config as params and artifact, and the lineage tags."""
    from moray.platform.tracking import flatten

    client = mlflow.MlflowClient()
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        return resume_run_id
    exp = mlflow.get_experiment_by_name(cfg.run.experiment)
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`moray.run_name` = '{cfg.run.name}'", output_format="list"
    )
    for run in runs:
        if run.info.status != "FINISHED":
            return run.info.run_id
    run = client.create_run(
        exp.experiment_id, run_name=cfg.run.name, tags={"moray.run_name": cfg.run.name, **tags}
    )
    items = sorted(flatten(params).items())
    for i in range(0, len(items), 100):
        client.log_batch(
            run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i : i + 100]]
        )
    client.log_dict(run.info.run_id, dataclasses.asdict(cfg), CONFIG_ARTIFACT)
    return run.info.run_id


def _lineage(client, cfg: PretrainConfig, run_dir_uri: str) -> dict[str, str]:
    """Where this run's inputs came from: the curated data's manifest checksum and the curation run
    that wrote it (curation tags its run with the same checksum), and where the run keeps its state."""
    from moray.platform.data_contract import MANIFEST_FILE

    data = Storage(cfg.data.path)
    digest = data.sha256(data.path(MANIFEST_FILE))
    tags = {
        "moray.run_dir": run_dir_uri,
        "moray.data.path": cfg.data.path,
        "moray.data.manifest_sha256": digest,
    }
    experiments = [e.experiment_id for e in client.search_experiments()]
    curation = client.search_runs(experiments, f"tags.`moray.data.manifest_sha256` = '{digest}' "
                                  "and tags.`moray.job` = 'curate'", max_results=1)  # fmt: skip
    if curation:
        tags["moray.lineage.curation_run"] = curation[0].info.run_id
    return tags


def resume_config(ref: str, overrides: list[str]) -> tuple[PretrainConfig, str]:
    """The config of the MLflow run `ref` (id or name) with `overrides` applied, and its run id:
    what `--resume-from` continues. Refused when the run recorded no checkpoint."""
    import mlflow

    from moray.platform.tracking import find_run, tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    try:
        found = find_run(client, ref, tracking_uri())
    except LookupError as e:
        raise ConfigError(f"--resume-from: {e}") from None
    run_id = found.info.run_id
    if "moray.checkpoint.latest" not in found.data.tags:
        raise ConfigError(f"--resume-from {ref}: run {run_id} recorded no checkpoint (nothing to resume)")
    try:
        data = mlflow.artifacts.load_dict(f"{found.info.artifact_uri}/{CONFIG_ARTIFACT}")
    except Exception as e:  # MlflowException, OSError: a run logged before moray recorded its config
        raise ConfigError(
            f"--resume-from {ref}: run {run_id} has no readable {CONFIG_ARTIFACT} ({e})"
        ) from None
    cfg = from_dict(PretrainConfig, apply_overrides(copy.deepcopy(data), overrides))
    for key in ("name", "storage_path"):
        if getattr(cfg.run, key) != data["run"][key]:
            raise ConfigError(
                f"--resume-from: run.{key} is the resumed run's ({data['run'][key]!r}); it cannot change"
            )
    return cfg, run_id


def _check_cpus(cfg: PretrainConfig) -> None:
    """Ray Train holds its workers' CPUs away from Ray Data: a cluster with less than a read task's
    CPUs left beyond the workers would wait forever for its reads. An elastic run starts as many
    workers as fit, so the check is on that many."""
    from moray.jobs.pretrain.data import READ_TASK_CPUS
    from moray.platform.cluster import known_cpus

    total, per_worker = known_cpus(), cfg.scaling.cpus_per_worker
    if total is None:
        return
    lo, hi = cfg.scaling.worker_range
    workers = max(lo, min(hi, int(total // per_worker)))
    if total - workers * per_worker < READ_TASK_CPUS:
        fits = (total - READ_TASK_CPUS) / workers
        raise ConfigError(
            f"scaling: {workers} workers x cpus_per_worker={per_worker} leave less than the {READ_TASK_CPUS} CPU "
            f"Ray Data needs to read the shards, of the {total:g} CPUs Ray has here; set "
            f"scaling.cpus_per_worker to at most {fits:.3g} (workers may share cores)"
        )


def run(
    cfg: PretrainConfig, callbacks: list[Callback] | None = None, resume_run_id: str | None = None
) -> dict:
    """Train; returns a summary (run dir, MLflow run id, model version, final metrics).
    `callbacks` run inside every worker (e.g. the fault-injection hook of the tests);
    `resume_run_id` is the MLflow run `resume_config` found, which this run continues."""
    cfg = _resolved(cfg)
    plan = validate(cfg)  # before any cluster work
    _check_cpus(cfg)
    model_config = plan.model_config
    if cfg.train.val_batches and plan.val_sequences < cfg.data.global_batch_size:
        log.warning("no validation: the val split holds %d sequences, less than one global batch of %d",
                    plan.val_sequences, cfg.data.global_batch_size)  # fmt: skip

    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from moray.jobs.pretrain.data import read_split
    from moray.jobs.pretrain.loop import train_func
    from moray.jobs.pretrain.tracker import read_metrics
    from moray.platform.cluster import connect
    from moray.platform.tracking import register_hf_model, setup_mlflow, tracking_uri

    storage_uri = cfg.run.storage_path
    storage = Storage(storage_uri)
    run_dir = storage.path(cfg.run.name)
    mlflow = setup_mlflow(cfg.run.experiment)
    layouts = {w: run_layout(cfg, w, model_config).describe() for w in set(cfg.scaling.worker_range)}
    params = {"config": dataclasses.asdict(cfg), "model": model_config.to_dict(), "layout": layouts}
    lineage = _lineage(mlflow.MlflowClient(), cfg, storage.uri_of(run_dir))
    run_id = _mlflow_run(mlflow, cfg, params, {"moray.job": "pretrain", **lineage}, resume_run_id)
    connect()

    lo, hi = cfg.scaling.worker_range
    labels = cfg.objectives.code_exec.enabled  # read the code-execution labels only when trained on
    loop_config = {
        "config": dataclasses.asdict(cfg),
        "model_config": model_config.to_dict(),
        "seq_len": plan.manifest.seq_len,
        "storage": storage_uri,
        "data_path": cfg.data.path,
        "train_sequences": plan.train_sequences,
        "val_sequences": plan.val_sequences,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri(),
        "threads_per_worker": max(1, int(cfg.scaling.cpus_per_worker)),
        "callbacks": list(callbacks or []),
    }
    options = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=run_layout(cfg, hi, model_config).backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(lo, hi) if lo != hi else lo,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_uri,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        datasets={split: read_split(cfg.data.path, split, labels) for split in ("train", "val")},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=options),
    )
    try:
        trainer.fit()
    except Exception:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise

    client = mlflow.MlflowClient()
    # The export and metrics live in run storage; MLflow logs from a local copy when it is remote.
    local = Path(run_dir) if storage.is_local else Path(tempfile.mkdtemp(prefix="moray-export-"))
    if not storage.is_local:
        storage.download_dir(posixpath.join(run_dir, "export"), local / "export")
    export = local / "export"
    for plot in sorted((export / "plots").glob("*.png")):
        client.log_artifact(run_id, str(plot), artifact_path="plots")
    rows = read_metrics(run_dir, storage)
    with tempfile.TemporaryDirectory() as tmp:
        metrics_file = Path(tmp) / "metrics.jsonl"
        metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(run_id, str(metrics_file))
    version = None
    if cfg.run.register_model:
        version = register_hf_model(export / "model", cfg.run.register_model, run_id)
        tags = {"moray.lineage.pretrain_run": run_id, "moray.lineage.config": json.dumps(dataclasses.asdict(cfg)),
                **{k: v for k, v in lineage.items() if k.startswith(("moray.lineage.", "moray.data."))}}  # fmt: skip
        for key, value in tags.items():
            client.set_model_version_tag(cfg.run.register_model, str(version), key, value)
    client.set_terminated(run_id, status="FINISHED")
    return {
        "run_dir": run_dir if storage.is_local else f"{storage_uri.rstrip('/')}/{cfg.run.name}",
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri(),
        "registered_model": f"models:/{cfg.run.register_model}/{version}" if version else None,
        "hf_export": str(export / "model"),
        "steps": len(rows),
        "final": {k: v for k, v in rows[-1].items() if k != "loads"} if rows else {},
    }


def _resolved(cfg: PretrainConfig) -> PretrainConfig:
    """The config as recorded: a local data path made absolute, the default run storage spelled
    out (a resumed run finds both from any working directory)."""
    data = dataclasses.replace(
        cfg.data, path=cfg.data.path if "://" in cfg.data.path else str(Path(cfg.data.path).resolve())
    )
    run_section = dataclasses.replace(cfg.run, storage_path=cfg.run.storage_path or str(work_dir() / "runs"))
    return dataclasses.replace(cfg, data=data, run=run_section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moray pretrain", description="Pre-train a moray model on Ray Train.", allow_abbrev=False
    )
    parser.add_argument("--config", help="a YAML file (configs/pretrain/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume-from", metavar="RUN", help="continue an MLflow run (its id or name) from its "
                        "last checkpoint, with its config (--set may change it, e.g. train.max_steps)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.resume_from and args.config:
        parser.error("--resume-from continues the run's own config: change it with --set, not --config")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        resume_run_id = None
        if args.resume_from:
            cfg, resume_run_id = resume_config(args.resume_from, args.set)
        else:
            cfg = load_config(args.config, args.set)
        summary = run(cfg, resume_run_id=resume_run_id)
    except ConfigError as e:
        print(f"moray pretrain: invalid config: {e}", file=sys.stderr)
        return 2
    print(
        f"\nrun {cfg.run.name}: {summary['steps']} steps, final loss {summary['final'].get('loss', float('nan')):.4f}"
    )
    print(f"  checkpoints + metrics: {summary['run_dir']}")
    print(f"  Hugging Face export:   {summary['hf_export']}")
    print(f"  MLflow run:            {summary['mlflow_run_id']} ({summary['tracking_uri']})")
    if summary["registered_model"]:
        print(f"  registered model:      {summary['registered_model']}")
    print("  browse it: make mlflow-ui")
    return 0
