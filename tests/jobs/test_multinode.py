"""A multi-node run on this machine (tests/fixtures/multinode.py, in a process of its own): a
3-node Ray cluster curates, pre-trains with its workers spread over the nodes and serves, with data,
checkpoints and exports on one file:// URI; a worker node killed mid-curation leaves a ledger that
adds up, and one killed mid-training (its raylet and every process on it) is survived with losses
equal step for step to an uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def multinode(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    ray_tmp = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "MORAY_HOME": str(work / "home"),
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-m", "tests.fixtures.multinode", str(work)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_three_nodes_curate_with_a_node_lost_and_the_ledger_adds_up(multinode):
    assert multinode["nodes"] == 3
    curation = multinode["curation"]
    assert curation["killed_node"]
    counts = curation["counts"]["all"]
    assert counts["input"] == curation["records_read"] > 0
    assert counts["input"] == sum(counts[o] for o in ("kept", "filtered", "duplicate", "quarantined"))


def test_pretraining_survives_a_lost_node_with_equal_losses(multinode):
    base, faulty = multinode["baseline"], multinode["faulty"]
    assert multinode["killed_training_node"]  # rank 1's node went down at step 5
    assert base["steps"] == faulty["steps"] == list(range(8))
    # resumed from the step-4 checkpoint on the remaining nodes: the same sequences, the same losses
    assert faulty["losses"] == pytest.approx(base["losses"], abs=1e-6)
    assert multinode["alive_nodes"] == 2  # the head and the one worker node left


def test_the_export_serves_vertically_with_expert_shards_and_with_stages_on_two_nodes(multinode):
    served = multinode["serve"]
    assert served["vertical"] and served["horizontal"] == served["pipeline"] == served["vertical"]
    assert len(set(served["shard_nodes"])) == 2  # STRICT_SPREAD: the shards on two nodes
    assert len(set(served["stage_nodes"])) == 2  # and the stages
