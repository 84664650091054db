"""The hybrid policy on its own: which side a request goes to, how the vertical side's limit moves
with the two sides' time to first token, and the threads it lends the vertical side."""

import pytest

from moray.jobs.serve.hybrid import HybridPolicy, HybridSettings, request_size


def test_small_requests_go_vertical_until_it_is_full_and_large_ones_horizontal():
    policy = HybridPolicy(HybridSettings(small_tokens=64, vertical_limit=2))
    assert request_size({"prompt": [1] * 10, "max_tokens": 6}) == (1, 16)
    assert policy.choose({"prompt": "hi", "max_tokens": 8}) == ("vertical", "small")
    assert policy.choose({"prompt": [1] * 60, "max_tokens": 8}) == ("horizontal", "large")
    assert policy.choose({"prompt": "hi", "n": 2}) == ("horizontal", "large")
    policy.inflight["vertical"] = 2
    assert policy.choose({"prompt": "hi", "max_tokens": 8}) == ("horizontal", "overflow")
    assert policy.sent == {"vertical/small": 1, "horizontal/large": 2, "horizontal/overflow": 1}


def test_the_vertical_limit_starts_at_the_vertical_engines_batch():
    assert HybridPolicy(HybridSettings(), capacity=16).limit == 16  # max_num_seqs: runs without queueing
    assert HybridPolicy(HybridSettings(max_vertical_limit=8), capacity=16).limit == 8
    assert HybridPolicy(HybridSettings(vertical_limit=3), capacity=16).limit == 3  # the config's own
    assert HybridPolicy(HybridSettings()).limit == 64


def test_the_vertical_limit_follows_the_sides_time_to_first_token():
    policy = HybridPolicy(HybridSettings(vertical_limit=4))
    policy.observe("horizontal", 0.1)
    policy.observe("vertical", 0.5)  # the vertical side answers later: it takes fewer
    assert policy.limit == 3
    policy.ttft = {"vertical": 0.01, "horizontal": 0.1}
    policy.inflight["vertical"] = 3  # faster and full: it takes more
    policy.observe("vertical", 0.01)
    assert policy.limit == 4


def test_the_vertical_side_borrows_threads_while_the_horizontal_side_is_idle():
    policy = HybridPolicy(HybridSettings(lend_threads=4))
    assert policy.threads("vertical") == 4
    assert policy.threads("horizontal") is None
    policy.inflight["horizontal"] = 1
    assert policy.threads("vertical") == 0  # back to its own
    assert HybridPolicy(HybridSettings()).threads("vertical") is None  # lending off: nothing sent
    with pytest.raises(ValueError, match="lend_threads=-1"):
        HybridSettings(lend_threads=-1)
