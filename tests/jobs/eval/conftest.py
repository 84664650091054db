import pytest

from tests.actors.engine_fixtures import make_model_dir


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory):
    """A tiny random DeepSeek-V2 export with its tokenizer (1,024-token context)."""
    return make_model_dir(tmp_path_factory.mktemp("eval_model"))
