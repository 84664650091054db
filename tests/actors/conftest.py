import pytest

from tests.actors.engine_fixtures import make_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_hf"))
