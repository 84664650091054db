"""The pre-training job end to end on Ray Train (one shared local Ray): a 2-worker run, exact
resume after a killed worker, resuming onto another data-parallel size, corrupt checkpoints."""

import json
import math
from pathlib import Path

import pytest
import torch

from moray.jobs.pretrain import checkpoint as ckpt
from moray.jobs.pretrain.callbacks import KillWorkerOnce
from moray.jobs.pretrain.job import load_config, main, resume_config, run
from moray.jobs.pretrain.tracker import read_metrics
from moray.platform.config import ConfigError
from moray.platform.storage import Storage

STEPS = 12


def _cfg(data: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            f"data.path={data}",
            f"run.name={name}",
            f"train.max_steps={STEPS}",
            "train.checkpoint_every=3",
            "train.val_every=6",
            "train.warmup_steps=2",
            "train.keep_checkpoints=2",
            "scaling.num_workers=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def baseline(ray_local, packed_data):
    """An uninterrupted 2-worker run: the reference for the fault and elastic runs."""
    summary = run(_cfg(packed_data, "baseline"))
    return summary, read_metrics(Path(summary["run_dir"]))


def test_run_trains_tracks_checkpoints_and_registers(baseline, ray_local):
    import mlflow

    summary, rows = baseline
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.3
    assert all(math.isfinite(r["val_loss"]) for r in rows if (r["step"] + 1) % 6 == 0)
    for key in ("expert_balance", "device_balance", "comm_balance", "router_z_loss", "grad_norm", "lr",
                "tokens_per_s", "mfu", "drop_rate", "capacity_factor", "layer1/load_entropy"):  # fmt: skip
        assert key in rows[-1], key
    assert 0 < rows[-1]["mfu"] < 1
    # the capacity controller moved the factor from its initial value toward the target drop rate
    assert rows[-1]["capacity_factor"] != pytest.approx(1.25)

    run_dir = Path(summary["run_dir"])
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert kept == ["checkpoint-0000009", "checkpoint-0000012"]  # keep the last 2
    m0 = ckpt.verify(Storage(str(run_dir)), str(run_dir / kept[-1]))
    assert m0["world_size"] == 2 and m0["state"]["data"] == {"step": STEPS, "samples_consumed": STEPS * 8}
    assert set(m0["state"]) == {"data", "scheduler", "rng", "capacity", "mlflow_run_id"}  # bias: in the model

    from moray.model import load_pretrained

    model = load_pretrained(summary["hf_export"])
    assert (Path(summary["hf_export"]) / "tokenizer.json").is_file()
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = mlflow.MlflowClient()
    r = client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["config.train.max_steps"] == str(STEPS)
    assert len(client.get_metric_history(r.info.run_id, "loss")) == STEPS
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert artifacts == {"plots/loss_curve.png", "plots/expert_load_heatmap.png"}
    local = mlflow.artifacts.download_artifacts(summary["registered_model"])
    assert (Path(local) / "config.json").is_file()

    # every checkpoint is recorded in the run: step, URI, loss and each rank's checksums, which are
    # the manifests the checkpoint holds in storage
    names = [f"checkpoint-{s:07d}" for s in (3, 6, 9, 12)]
    records = [a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")]
    assert records == [f"checkpoints/{n}.json" for n in names]
    for name in kept:
        record = mlflow.artifacts.load_dict(f"{r.info.artifact_uri}/checkpoints/{name}.json")
        assert (
            record["uri"] == str(run_dir / name)
            and record["step"] == int(name[-7:])
            and record["world_size"] == 2
        )
        for rank in (0, 1):
            on_disk = json.loads((run_dir / name / f"manifest-rank{rank}.json").read_text())["files"]
            assert record["files"][f"rank{rank}"] == on_disk
    loss_at = {row["step"] + 1: row["loss"] for row in rows}
    assert record["loss"] == pytest.approx(loss_at[12], abs=1e-6)
    assert r.data.tags["moray.checkpoint.latest"] == str(run_dir / "checkpoint-0000012")
    assert r.data.tags["moray.checkpoint.step"] == "12" and r.data.tags["moray.run_dir"] == str(run_dir)
    assert (
        mlflow.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )


def test_killed_worker_resumes_exactly(baseline, packed_data, tmp_path):
    _, want = baseline
    fault = KillWorkerOnce(rank=1, step=7, marker=str(tmp_path / "killed"))
    summary = run(_cfg(packed_data, "fault", "scaling.max_failures=1"), callbacks=[fault])
    assert (tmp_path / "killed").exists()  # a worker really died
    got = read_metrics(Path(summary["run_dir"]))
    assert [r["step"] for r in got] == list(range(STEPS))
    # deterministic mode: the same sequences, exactly once each, and the same losses step for step
    assert [r["batch_token_sum"] for r in got] == [r["batch_token_sum"] for r in want]
    assert [r["sample_start"] for r in got] == [8.0 * s for s in range(STEPS)]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)


def test_resumes_onto_another_data_parallel_size(baseline, packed_data, tmp_path):
    _, want = baseline
    fault = KillWorkerOnce(rank=0, step=7, marker=str(tmp_path / "stop"))
    import ray.train

    with pytest.raises(
        ray.train.TrainingFailedError
    ):  # no retries: the 2-worker run stops after checkpoint 6
        run(_cfg(packed_data, "elastic", "scaling.max_failures=0"), callbacks=[fault])
    # Elastic restart, as `moray pretrain --resume-from elastic --set ...` does it: the failed MLflow
    # run's own config, with num_workers=(1, 2), but at 3 CPUs a worker only one fits in the 4-CPU
    # test cluster, so Ray Train starts 1 worker and it reshards the 2-rank checkpoint.
    cfg, run_id = resume_config("elastic", ["scaling.num_workers=[1,2]", "scaling.cpus_per_worker=3"])
    assert (cfg.scaling.cpus_per_worker, cfg.train.checkpoint_every, cfg.run.name) == (3, 3, "elastic")
    summary = run(cfg, resume_run_id=run_id)
    assert summary["mlflow_run_id"] == run_id  # the same MLflow run goes on
    got = read_metrics(Path(summary["run_dir"]))
    assert [r["step"] for r in got] == list(range(STEPS))
    final = Path(summary["run_dir"]) / "checkpoint-0000012"
    assert ckpt.verify(Storage(str(final)), str(final))["world_size"] == 1
    assert [r["batch_token_sum"] for r in got] == [r["batch_token_sum"] for r in want]
    # 1 rank x 2 micro-batches == 2 ranks x 1: equal up to float summation order
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=2e-4)


def test_corrupt_checkpoint_falls_back_to_the_previous(baseline, tmp_path, caplog):
    summary, _ = baseline
    run_dir = tmp_path / "copy"
    import shutil

    for name in ("checkpoint-0000009", "checkpoint-0000012"):
        shutil.copytree(Path(summary["run_dir"]) / name, run_dir / name)
    shard = next((run_dir / "checkpoint-0000012").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"corrupted!")
    path, m0 = ckpt.latest_valid(Storage(str(run_dir)), str(run_dir))
    assert path.endswith("checkpoint-0000009") and m0["state"]["data"]["step"] == 9
    assert "fails its checksum" in caplog.text
    (run_dir / "checkpoint-0000009" / "manifest-rank1.json").unlink()
    assert (
        ckpt.latest_valid(Storage(str(run_dir)), str(run_dir)) is None and "partial checkpoint" in caplog.text
    )


@pytest.mark.parametrize(
    "override,match",
    [
        ("scaling.num_workers=3", "global_batch_size=8"),
        ("train.max_steps=0", "max_steps=0"),
        ("parallel.pp_schedule=zero_bubble", "pp_schedule='zero_bubble': use one of"),
        ("parallel.virtual_stages=2", "virtual_stages=2: virtual stages split pipeline ranks; set pp > 1"),
        ("parallel.tp=4", r"scaling.num_workers=2: world size 2 is not divisible by pp\*tp=4"),
        ("model.preset=huge", "unknown model preset"),
        ("data.path=/nonexistent", "no manifest.json"),
        ("train.capacity_factor=9", "capacity_factor=9"),
        ("train.precision=fp16", r"precision='fp16': use one of \('auto', 'fp32', 'bf16'\) or null"),
        ("parallel.dp_mode=zero3", r"dp_mode='zero3': use one of \('auto', 'shard', 'replicate'\)"),
        (("parallel.tp=2", "parallel.dp_mode=replicate"), "dp_mode='replicate' takes pure data parallelism"),
        # 3 sequences per rank do not make whole micro-batches of 4
        ("data.global_batch_size=6", "micro_batch_size=4"),
        # the curated tokenizer's ids and vocabulary are the model's: a different one is refused
        (
            "model.overrides={eos_token_id: 2}",
            "eos_token_id=2 conflicts with the curated data's eos_token_id=1",
        ),
        ("model.overrides={vocab_size: 1024}", "vocab_size=1024 conflicts"),
        # one place for each setting
        ("model.overrides={capacity_factor: 2.0}", "train.capacity_factor"),
        ("model.overrides={ep_size: 2}", "parallel.ep"),
    ],
)
def test_bad_configs_are_refused_before_cluster_work(packed_data, override, match):
    with pytest.raises(ConfigError, match=match):
        run(_cfg(packed_data, "bad", *([override] if isinstance(override, str) else override)))


def test_resume_from_refusals(baseline, capsys):
    """Before Ray: an unknown run, a change of the resumed run's name, --config beside --resume-from."""
    with pytest.raises(ConfigError, match="--resume-from: no MLflow run with id or name 'nope'"):
        resume_config("nope", [])
    with pytest.raises(ConfigError, match="run.name is the resumed run's"):
        resume_config("baseline", ["run.name=other"])
    assert main(["--resume-from", "nope"]) == 2
    assert "no MLflow run with id or name 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--resume-from", "baseline", "--config", "configs/pretrain/tiny.yaml"])
    assert "change it with --set, not --config" in capsys.readouterr().err


def test_manifest_and_tokenizer_are_required(packed_data, tmp_path):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(packed_data, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        run(_cfg(broken, "bad"))
    json.loads((packed_data / "manifest.json").read_text())  # the fixture itself is intact


def test_storage_uri_runs_and_resumes(ray_local, packed_data, tmp_path):
    """Data and run storage named by pyarrow filesystem URIs (here file://; s3:// and gs:// go the
    same way)."""
    uri = (tmp_path / "store").as_uri()
    first = run(_cfg(packed_data.as_uri(), "remote", f"run.storage_path={uri}", "train.max_steps=4",
                     "train.checkpoint_every=2"))  # fmt: skip
    assert first["final"]["loss"] > 0
    assert first["run_dir"] == str(tmp_path / "store" / "remote")  # file:// resolves to the local filesystem
    storage = Storage(uri)
    assert "checkpoint-0000004" in storage.list_dirs(storage.path("remote"))
    # a finished run continues by its MLflow run id, with a later max_steps
    assert first["mlflow_run_id"] and Storage(uri).uri_of(storage.path("remote")) == f"{uri}/remote"
    cfg, run_id = resume_config(first["mlflow_run_id"], ["train.max_steps=6"])
    assert (cfg.run.storage_path, cfg.train.max_steps, run_id) == (uri, 6, first["mlflow_run_id"])
    again = run(cfg, resume_run_id=run_id)
    rows = read_metrics(storage.path("remote"), storage)
    assert [r["step"] for r in rows] == list(range(6))  # resumed at 4: steps 4 and 5 added
    from moray.model import load_pretrained

    assert load_pretrained(again["hf_export"]).config.vocab_size > 0


def test_checkpoint_restores_from_a_non_local_filesystem(baseline, tmp_path):
    """The object-store path: verify and download through pyarrow, then reshard onto one process."""
    import shutil

    import pyarrow.fs as pafs

    from moray.jobs.pretrain.optim import build_optimizer
    from moray.model import Transformer, load_pretrained

    summary, _ = baseline
    shutil.copytree(
        Path(summary["run_dir"]) / "checkpoint-0000012", tmp_path / "bucket" / "run" / "checkpoint-0000012"
    )
    storage = Storage(
        "run", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    )
    assert not storage.is_local
    path, m0 = ckpt.latest_valid(storage, "run")
    exported = load_pretrained(summary["hf_export"])
    model = Transformer(exported.config)
    ckpt.load(storage, path, model, build_optimizer(model, "adamw", 1e-3, 0.0))
    for (name, got), want in zip(model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(got, want), name


def test_tensor_and_expert_parallel_under_ray_train(ray_local, packed_data):
    """parallel.tp=2 parallel.ep=2 on 4 Ray Train workers (2 data-parallel x 2 tensor-parallel,
    the routed experts split over the 2 data-parallel ranks): checkpoints and the export hold whole
    tensors (the layouts' numbers against one process: test_parallel.py)."""
    from moray.model import load_pretrained

    summary = run(_cfg(packed_data, "tp2-ep2", "parallel.tp=2", "parallel.ep=2", "scaling.num_workers=4",
                       "train.max_steps=3", "train.checkpoint_every=3", "train.val_every=3",
                       "run.register_model=null"))  # fmt: skip
    rows = read_metrics(Path(summary["run_dir"]))
    assert [r["step"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert math.isfinite(rows[-1]["val_loss"])  # validation on vocab-sharded logits too
    assert rows[-1]["comm_balance"] > 0  # the device-level losses see the 2 expert-parallel ranks
    final = Path(summary["run_dir"]) / "checkpoint-0000003"
    assert ckpt.verify(Storage(str(final)), str(final))["world_size"] == 4
    model = load_pretrained(summary["hf_export"])
    assert model.layers[1].mlp.experts.gate_up_proj.shape[0] == model.config.n_routed_experts
    assert model.lm_head.weight.shape[0] == model.config.vocab_size
    assert model.layers[0].self_attn.kv_b_proj.weight.shape[0] == model.config.num_attention_heads * 32


def test_pipeline_parallel_resizes_under_ray_train(baseline, packed_data, tmp_path):
    """parallel.pp=2 on 4 workers (2 stages x 2 data-parallel ranks), stopped after the checkpoint of
    step 6, then restarted elastic on [2, 3] workers of 1 CPU: 3 fit the 4-CPU test cluster, the
    layout takes 2 (pp2 x dp1) and the third waits as a spare; the 4-rank checkpoint reshards onto
    the 2 ranks and the run finishes (the layouts' numbers against one process: test_parallel.py)."""
    import ray.train

    _, want = baseline
    run_dir = tmp_path / "runs" / "pp-elastic"
    pp = (
        "parallel.pp=2",
        "data.micro_batch_size=2",
        "run.register_model=null",
        f"run.storage_path={run_dir.parent}",
    )
    fault = KillWorkerOnce(rank=0, step=7, marker=str(tmp_path / "stop"))
    with pytest.raises(ray.train.TrainingFailedError):
        run(
            _cfg(packed_data, "pp-elastic", *pp, "scaling.num_workers=4", "scaling.max_failures=0"),
            callbacks=[fault],
        )
    _, stopped = ckpt.latest_valid(Storage(str(run_dir)), str(run_dir))
    assert stopped["world_size"] == 4 and stopped["state"]["data"]["step"] == 6

    run(_cfg(packed_data, "pp-elastic", *pp, "scaling.num_workers=[2,3]", "scaling.cpus_per_worker=1.0"))
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(STEPS))
    assert [r["batch_token_sum"] for r in got] == [r["batch_token_sum"] for r in want]  # the same data, once
    assert all(math.isfinite(r["loss"]) for r in got) and math.isfinite(got[-1]["val_loss"])
    assert got[-1]["lm_loss"] < got[0]["lm_loss"]
    assert [r["spare_workers"] for r in got] == [0.0] * 6 + [1.0] * 6  # 4 ranks, then 2 of 3 workers
    final = run_dir / "checkpoint-0000012"
    assert ckpt.verify(Storage(str(final)), str(final))["world_size"] == 2


@pytest.mark.parametrize(
    "overrides,match",
    [
        # elastic resizing changes only dp: every world size in the range must take the layout
        (["parallel.ep=2", "scaling.num_workers=[1,2]"], r"scaling.num_workers=1: parallel.ep=2: expert-parallel "
         r"ranks are borrowed from the 1 data-parallel ranks, so ep must divide dp"),
        (["parallel.tp=2", "scaling.num_workers=3"], r"scaling.num_workers=3: world size 3 is not divisible "
         r"by pp\*tp=2"),
        (["parallel.pp=2", "scaling.num_workers=[1,2]"], r"scaling.num_workers=1: fewer workers than pp x tp = 2"),
        # 2 ranks x 1 micro-batch of 4 cannot fill 2 pipeline stages under 1F1B
        (["parallel.pp=2", "scaling.num_workers=4"], r"parallel.pp=2 with 1f1b needs at least 2 micro-batches"),
        (["parallel.pp=4", "scaling.num_workers=4"], r"parallel.pp=4 x virtual_stages=1 stages: more than the "
         r"model's 3 layers"),
        (["parallel.tp=2", "model.overrides={rope_per_head_base: true}"], r"parallel.tp=2: the model extra "
         r"rope_per_head_base is not supported with tensor parallelism"),
        (["parallel.tp=2", "model.overrides={num_attention_heads: 3}"], r"parallel.tp=2: must divide the "
         r"model's num_attention_heads \(3\)"),
        # Ray Train's workers would hold every CPU and Ray Data's reads would wait forever
        (["parallel.tp=2", "scaling.num_workers=4", "scaling.cpus_per_worker=1.0"], r"scaling: 4 workers x "
         r"cpus_per_worker=1.0 leave less than the 0.25 CPU Ray Data needs to read the shards"),
    ],
)  # fmt: skip
def test_layouts_the_model_or_worker_range_cannot_take_are_refused(packed_data, overrides, match):
    """Before Ray starts, saying why."""
    with pytest.raises(ConfigError, match=match):
        run(_cfg(packed_data, "bad", *overrides))


@pytest.mark.parametrize("workers", [1, 2])
def test_bf16_precision_trains_with_working_weights(ray_local, packed_data, workers):
    """train.precision=bf16: the loop's bf16 working weights, on one worker or on two replicas that
    average their gradients through shared memory (timed in the step breakdown); the run's params
    say what computed (and what the CPU offers), and the exported weights are the fp32 masters."""
    import mlflow

    from moray.model import load_pretrained
    from moray.platform.parallel import cpu_bf16_isa

    summary = run(_cfg(packed_data, f"bf16-{workers}", "train.precision=bf16", f"scaling.num_workers={workers}",
                       "train.max_steps=3", "train.checkpoint_every=3", "run.register_model=null"))  # fmt: skip
    assert 0 < summary["final"]["loss"] < 10
    mlflow.set_tracking_uri(summary["tracking_uri"])
    params = mlflow.MlflowClient().get_run(summary["mlflow_run_id"]).data.params
    layout = f"layout.{workers}"
    assert params[f"{layout}.compute_dtype"] == "bfloat16" and params["config.train.precision"] == "bf16"
    assert params[f"{layout}.cpu_bf16"] == (cpu_bf16_isa() or "none")
    means = [row["time/gradient_mean_s"] for row in read_metrics(Path(summary["run_dir"]))]
    assert all(s > 0 for s in means) if workers == 2 else means == [0.0] * 3
    exported = load_pretrained(summary["hf_export"])
    assert {p.dtype for p in exported.parameters()} == {torch.float32}


def test_auxiliary_objectives_train_under_ray_train_and_log_each_loss(ray_local, tmp_path):
    """All three objectives on 2 data-parallel workers (DDP): each loss logged on its own, the heads
    in the export; code-execution labels read from the data's optional column. Refusals first: no
    labels in the data, and a layout the heads do not run under."""
    from tests.fixtures.packed_data import write_packed_dataset

    on = [
        "objectives.nsp.enabled=true",
        "objectives.span_boundary.enabled=true",
        "objectives.code_exec.enabled=true",
    ]
    plain = write_packed_dataset(tmp_path / "plain")
    with pytest.raises(ConfigError, match="no code-execution labels"):
        run(_cfg(plain, "aux-nolabels", *on))
    with pytest.raises(ConfigError, match="parallel.tp and parallel.pp must be 1"):
        run(_cfg(plain, "aux-tp", "objectives.nsp.enabled=true", "parallel.tp=2"))

    data = write_packed_dataset(tmp_path / "labelled", exec_labels=True)
    summary = run(
        _cfg(data, "aux", *on, "train.max_steps=3", "train.checkpoint_every=3", "run.register_model=null")
    )
    metrics = read_metrics(Path(summary["run_dir"]))
    for name in ("nsp_loss", "span_boundary_loss", "code_exec_loss"):
        values = [m[name] for m in metrics]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), (name, values)
    from moray.model import load_pretrained

    exported = load_pretrained(summary["hf_export"])
    assert exported.config.aux_heads == ["nsp", "span_boundary", "code_exec"]
    assert exported.aux_heads.nsp is not None
