"""`moray serve` refuses what cannot work before Ray starts: a missing model directory, an
unreadable key file, abbreviated flags; and takes API keys from a file and the environment."""

import argparse
import os
import subprocess
import sys

import pytest

from moray.jobs.serve.__main__ import add_arguments, main, prepare


def test_missing_model_fails_before_ray_with_one_line(tmp_path):
    missing = tmp_path / "missing-dir"
    # an address nothing listens on: had the command reached Ray, the error would be Ray's
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    p = subprocess.run(
        [sys.executable, "-m", "moray.jobs.serve", "--model", str(missing)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"moray serve: error: model {str(missing)!r}: no such directory (and not an MLflow models:/ URI)"
    ]


def test_a_directory_without_weights_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--model", str(tmp_path)]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err


def test_no_abbreviated_flags(tiny_model_dir, capsys):
    for argv in (["--mod", str(tiny_model_dir)], ["--model", str(tiny_model_dir), "--replica", "2"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "unrecognized arguments: --replica 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model_dir), "--port", "70000"])
    assert "70000 is not in [1, 65535]" in capsys.readouterr().err


def test_api_keys_from_flags_file_and_environment(tiny_model_dir, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# the ops team\nsk-file\n\n  sk-file2  \n")
    monkeypatch.setenv("MORAY_API_KEYS", "sk-env, sk-file,")
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny_model_dir), "--api-key", "sk-flag", "--api-key-file", str(keys)]
    )
    settings = prepare(args)
    assert settings.api_keys == ["sk-flag", "sk-file", "sk-file2", "sk-env"]
    assert settings.api_key_file is None  # resolved here: replicas elsewhere get the keys themselves


def test_an_unreadable_key_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nokeys"
    assert main(["--model", str(tiny_model_dir), "--api-key-file", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moray serve: error: api_key_file {str(missing)!r}: No such file or directory"


def test_a_horizontal_layout_the_model_cannot_use_is_refused_before_ray(tiny_model_dir, tmp_path, capsys):
    """More shards than experts, spare copies that do not divide over the shards, a loads file that
    does not match the model or is missing, quantized weights in shards: each refused with exit 2, naming
    what is wrong."""
    horizontal = ["--model", str(tiny_model_dir), "--mode", "horizontal"]
    loads = tmp_path / "loads.json"
    loads.write_text('{"1": [1, 2, 3]}')
    for extra, message in (
        (["--expert-shards", "9"], "9 shards for 8 routed experts"),
        (["--expert-shards", "3"], "must divide evenly over 3 shards"),
        (["--expert-loads", str(loads)], "do not give one count per expert (8)"),
        (["--expert-loads", str(tmp_path / "none.json")], "expert_shards.loads"),
        (["--quantize", "int8"], "not quantize=int8"),
        (["--bf16"], "the expert shards serve the model's own weights, not bf16"),
    ):
        assert main(horizontal + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        main(horizontal + ["--replicas", "3:2"])
    assert "2 is not in [3, ...]" in capsys.readouterr().err


def test_a_pipeline_the_model_cannot_use_is_refused_before_ray(tiny_model_dir, capsys):
    """More stages than layers, quantized weights in stages: refused with exit 2, naming what is wrong."""
    from moray.jobs.serve.loading import model_config

    layers = model_config(str(tiny_model_dir)).num_hidden_layers
    pipeline = ["--model", str(tiny_model_dir), "--mode", "pipeline"]
    for extra, message in (
        (
            ["--stages", str(layers + 1)],
            f"pipeline.num_stages: {layers + 1} pipeline stages: the model has {layers}",
        ),
        (["--quantize", "int4"], "the pipeline stages serve the model's own weights, not quantize=int4"),
        (["--device", "cuda"], "pipeline stages run on CPUs"),
    ):
        assert main(pipeline + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        main(pipeline + ["--stages", "0"])
