"""Bad input is refused before Ray starts, each with a message naming what was wrong."""

from __future__ import annotations

import shutil
import socket

import pytest

from moray.jobs.eval.__main__ import main


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every refusal here must come before anything connects to Ray."""

    def refuse(**_):
        raise AssertionError("Ray was started for a refused evaluation")

    monkeypatch.setattr("moray.platform.cluster.connect", refuse)


def refused(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_unknown_task(capsys, eval_model_dir):
    err = refused(capsys, "--model", str(eval_model_dir), "--tasks", "mmlu,hellaswag")
    assert "unknown task hellaswag: the tasks are wikitext, mmlu, gsm8k, humaneval" in err


def test_missing_data_file(capsys, eval_model_dir, tmp_path):
    err = refused(capsys, "--model", str(eval_model_dir), "--tasks", "gsm8k", "--data-dir", str(tmp_path))
    assert f"task gsm8k: {tmp_path}/gsm8k-test.jsonl does not exist" in err


def test_model_without_tokenizer(capsys, eval_model_dir, eval_data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(eval_model_dir, bare)
    (bare / "tokenizer.json").unlink()
    err = refused(capsys, "--model", str(bare), "--tasks", "wikitext", "--data-dir", str(eval_data))
    assert "no tokenizer.json" in err
    err = refused(
        capsys, "--model", str(tmp_path / "nothing"), "--tasks", "wikitext", "--data-dir", str(eval_data)
    )
    assert "no such directory" in err


def test_unreachable_endpoint(capsys, eval_data):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    err = refused(
        capsys, "--endpoint", f"http://127.0.0.1:{port}/v1", "--tasks", "gsm8k", "--data-dir", str(eval_data)
    )
    assert f"http://127.0.0.1:{port}/v1 cannot be reached" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "mmlu"], "give exactly one of --model"),
        (["--model", "m", "--endpoint", "http://x/v1"], "give exactly one of --model"),
        (
            ["--endpoint", "http://127.0.0.1:9/v1", "--tasks", "mmlu,gsm8k"],
            "mmlu score the model's log-likelihoods",
        ),
        (
            ["--model", "m", "--tasks", "humaneval", "--samples", "2", "--k", "1,5"],
            "pass@k needs 1 <= k <= samples (2)",
        ),
        (["--model", "m", "--tasks", "mmlu,mmlu"], "a task is named twice"),
        (["--model", "m", "--every", "60"], "--every watches a deployment: it needs --endpoint"),
        (["--model", "m", "--max-gen-tokens", "mmlu=5"], "only gsm8k and humaneval generate"),
    ],
)
def test_bad_combinations(capsys, argv, message):
    assert message in refused(capsys, *argv)


@pytest.mark.parametrize("argv", [["--model", "m", "--lim", "3"], ["--model", "m", "--limit", "0"],
                                  ["--model", "m", "--max-gen-tokens", "gsm8k"]])  # fmt: skip
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "usage: moray eval" in capsys.readouterr().err
