"""The stage cache runs a stage again when the cluster loses a node or worker under it (the
multi-node test kills one for real: tests/jobs/test_multinode.py), and never for the stage's own
errors."""

import pytest
import ray.exceptions as rex

from moray.jobs.curate.cache import STAGE_ATTEMPTS, StageCache, lost_to_the_cluster
from moray.jobs.curate.rows import ROW_SCHEMA


def _flaky(errors: list[BaseException], out):
    calls = []

    def build():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        (out / "made.txt").write_text("done")
        return {"rows": 3}, [out / "made.txt"]

    return build, calls


def test_a_stage_lost_to_a_dead_node_runs_again(tmp_path, capsys):
    cache = StageCache(tmp_path, ROW_SCHEMA)
    died = RuntimeError("ray.exceptions.ActorDiedError: The actor died because its node has died.")
    build, calls = _flaky([rex.NodeDiedError("node 1 died"), died], tmp_path)
    assert cache.files("stage", {}, build) == {"rows": 3}
    assert len(calls) == 3 and capsys.readouterr().out.count("running the stage again") == 2
    build, calls = _flaky([rex.WorkerCrashedError()] * STAGE_ATTEMPTS, tmp_path)
    with pytest.raises(rex.WorkerCrashedError):  # a cluster that keeps losing it: the error, in the end
        StageCache(tmp_path / "again", ROW_SCHEMA).files("stage", {}, build)
    assert len(calls) == STAGE_ATTEMPTS


def test_the_stages_own_errors_are_not_retried(tmp_path):
    build, calls = _flaky([ValueError("bad config")], tmp_path)
    with pytest.raises(ValueError, match="bad config"):
        StageCache(tmp_path, ROW_SCHEMA).files("stage", {}, build)
    assert len(calls) == 1
    assert not lost_to_the_cluster(ValueError("a value")) and lost_to_the_cluster(
        rex.ObjectLostError("x", None, "")
    )
