from pathlib import Path

import pytest

from tests.actors.engine_fixtures import make_model_dir

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "eval"  # ../shared/data/eval


@pytest.fixture(scope="session")
def eval_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data/eval is not here")
    return DATA


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory):
    """A tiny random DeepSeek-V2 export with its tokenizer (1,024-token context)."""
    return make_model_dir(tmp_path_factory.mktemp("eval_model"))
