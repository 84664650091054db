import json

from moray.platform.cli import main


def test_help_lists_model_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "model" in capsys.readouterr().out


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
