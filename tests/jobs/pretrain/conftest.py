from pathlib import Path

import pytest

from tests.fixtures.packed_data import write_packed_dataset


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    """96 train / 16 val sequences of 32 tokens of Shakespeare, a curation output by the data contract."""
    return write_packed_dataset(tmp_path_factory.mktemp("curated"))
