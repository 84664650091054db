import numpy as np

from moray.jobs.curate import semdedup
from moray.jobs.curate.__main__ import _source


def test_minilm_ships_offline_and_catches_paraphrased_copies():
    model = semdedup.load_model()
    texts = [
        "The committee approved the new budget for the city's public schools on Tuesday.",
        "On Tuesday the committee approved the new budget for the city's public schools.",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "The quarterback threw three touchdown passes in the second half of the game.",
    ]
    emb = model.encode(texts, normalize_embeddings=True)
    assert emb.shape == (4, 384)
    pairs, _ = semdedup.duplicate_pairs(
        ["a", "b", "c", "d"], np.asarray(emb), semdedup.SemDedupConfig(eps=0.05)
    )
    assert pairs == [("a", "b")]


def test_cli_input_specs():
    assert _source("data/x.jsonl=academic") == {"path": "data/x.jsonl", "domain": "academic"}
    assert _source("src/main.py") == {"path": "src/main.py", "domain": "code"}
    assert _source("crawl/") == {"path": "crawl/", "domain": "web"}
