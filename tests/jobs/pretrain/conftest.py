from pathlib import Path

import pytest

from moray.jobs.pretrain.sample_data import write_packed_dataset


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    """96 train / 16 val sequences of 32 tokens of Shakespeare, in the curation contract's format."""
    return write_packed_dataset(tmp_path_factory.mktemp("curated"))
