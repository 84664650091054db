import json
import subprocess
import sys

import pytest

from moray.platform.cli import COMMANDS, main


def test_help_lists_every_command_with_its_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("curate", "pretrain", "serve", "eval", "models", "model", "plan"):
        assert name in COMMANDS
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in out.splitlines()), out


def test_the_cli_imports_no_job():
    code = "import sys, moray.platform.cli; print([m for m in sys.modules if m.startswith('moray.jobs')])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--he", "model"], "--he"),  # the dispatcher: not --help
        (["model", "info", "tiny", "--seq", "64"], "--seq"),  # not --seq-len
        (["model", "generate", "tiny", "--max-new", "2"], "--max-new"),  # not --max-new-tokens
        (["curate", "--out", "somewhere"], "--out"),  # not --output
        (["pretrain", "--conf", "configs/pretrain/tiny.yaml"], "--conf"),  # not --config
        (["pretrain", "--resume", "r"], "--resume"),  # not --resume-from
        (["models", "list", "--js"], "--js"),  # not --json
    ],
)
def test_abbreviated_flags_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_model_info_json(capsys):
    assert main(["model", "info", "deepseek-v2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["total_params"] / 1e9) == 236
    assert round(info["activated_params"] / 1e9) == 21


def test_model_info_text_says_what_is_activated(capsys):
    assert main(["model", "info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "activated per token" in out and "input embedding" in out


def test_model_info_unknown_preset_is_a_clear_error(capsys):
    try:
        main(["model", "info", "nope"])
    except SystemExit as e:
        assert "neither a preset" in str(e.code)


def test_model_generate_runs(capsys):
    assert main(["model", "generate", "tiny", "--max-new-tokens", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generated"]) == 4


def test_model_info_reads_yaml_configs(capsys):
    from pathlib import Path

    yaml_file = Path(__file__).parents[2] / "configs/model/tiny-extras.yaml"
    assert main(["model", "info", str(yaml_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 259_104  # the extras add parameters
