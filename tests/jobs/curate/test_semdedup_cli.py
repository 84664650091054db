import numpy as np
import pandas as pd
import ray

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


def test_the_driver_embeds_as_the_actor_pool_does(ray_local):
    """Few documents are embedded by the driver (no actor pool to start); many by the pool. Both give
    the same vectors for the same texts."""
    texts = [
        f"Document {i} talks about {topic}." for i, topic in enumerate(["rivers", "tax law", "chess"] * 4)
    ]
    rows = {"uid": [f"u{i}" for i in range(len(texts))], "text": texts}
    cfg = semdedup.SemDedupConfig(batch_size=4)
    by_pool = semdedup.embed(ray.data.from_items([dict(zip(rows, r)) for r in zip(*rows.values())]), cfg)
    by_pool = by_pool.to_pandas().sort_values("uid")
    by_driver = semdedup.embed_in_driver(pd.DataFrame(rows), cfg).sort_values("uid")
    assert list(by_pool["uid"]) == list(by_driver["uid"])
    np.testing.assert_allclose(np.stack(by_pool["embedding"]), np.stack(by_driver["embedding"]), atol=1e-5)
