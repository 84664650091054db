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
