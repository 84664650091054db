from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.curated_slice import CORPUS, curation_config


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("../shared/data/corpus is not here")
    return CORPUS.resolve()


@pytest.fixture(scope="session")
def eval_data() -> Path:
    """../shared/data/eval: WikiText-2, MMLU, GSM8K, HumanEval (the evaluation job's tests)."""
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
    if not data.is_dir():
        pytest.skip("../shared/data/eval is not here")
    return data


@pytest.fixture(scope="session")
def curated_slice(ray_local, corpus, tmp_path_factory):
    """The one real curation run of the session (tests/fixtures/curated_slice.py): its config, its
    output directory and the manifest `Curation.run` returned."""
    from moray.jobs.curate.pipeline import Curation, load_config

    config = curation_config(tmp_path_factory.mktemp("curated_slice"))
    manifest = Curation(load_config(data=config)).run()
    return SimpleNamespace(config=config, out=Path(config["output"]), manifest=manifest)


@pytest.fixture(scope="session")
def trained(ray_local, curated_slice, tmp_path_factory):
    """The session's short training run: 3 steps on the session's curation output, exported and
    registered as `contract` (tests/jobs/test_data_contract_e2e.py, tests/jobs/test_dashboards.py).
    At its last step rank 0 scrapes Ray's metrics endpoint for every metric the training dashboard
    queries (`summary["scrape"]`). (data dir, HF export, the job's summary)."""
    import json

    from moray.jobs.pretrain.job import load_config as pretrain_config
    from moray.jobs.pretrain.job import run as pretrain
    from tests.fixtures.prometheus import ScrapeWhenExported, queried_metrics

    out = curated_slice.out
    cfg = pretrain_config(None, [
        f"data.path={out}", "run.name=contract", "run.register_model=contract", "train.max_steps=3",
        "train.warmup_steps=1", "train.checkpoint_every=1", "train.val_every=1", "scaling.num_workers=1",
        "data.global_batch_size=4", "data.micro_batch_size=2",
    ])  # fmt: skip
    scraped = tmp_path_factory.mktemp("scrape") / "training.json"
    metrics = sorted(queried_metrics(Path(__file__).parents[2] / "dashboards" / "moray-training.json"))
    probe = ScrapeWhenExported(
        ray_local.metrics_url, step=2, metrics=metrics, run="contract", out=str(scraped)
    )
    summary = pretrain(cfg, callbacks=[probe])
    summary["scrape"] = json.loads(scraped.read_text())
    return out, Path(summary["hf_export"]), summary
