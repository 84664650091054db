from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("../shared/data/corpus is not here")
    return CORPUS.resolve()
