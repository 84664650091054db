"""The serving tokenizer reads a model directory as transformers does: chat template from
chat_template.jinja / tokenizer_config.json, else moray's one default; stop ids from
generation_config.json (eos as an int or a list)."""

import json
import shutil

import pytest

from moray.actors.engine import Tokenizer
from moray.actors.engine.tokenizer import generation_stop_ids
from moray.model.hf import DEFAULT_CHAT_TEMPLATE


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def test_export_gives_the_contract_ids_and_default_template(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    assert tok.eos_token_id == 1 and tok.stop_token_ids == (1,)  # <|eos|>, from generation_config.json
    assert tok._tok.id_to_token(1) == "<|eos|>"
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def test_stop_ids_from_generation_config(model_dir):
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    tok = Tokenizer.from_dir(model_dir)
    assert tok.eos_token_id == 7 and tok.stop_token_ids == (7, 1)
    # the model's eos, passed by the loader, comes first; the file's ids join it, once each
    tok = Tokenizer.from_dir(model_dir, eos_token_id=1)
    assert tok.eos_token_id == 1 and tok.stop_token_ids == (1, 7)
    (model_dir / "generation_config.json").unlink()
    assert generation_stop_ids(model_dir) == ()
    assert Tokenizer.from_dir(model_dir).stop_token_ids == ()
    assert Tokenizer.from_dir(model_dir, eos_token_id=1).stop_token_ids == (1,)


def test_no_template_anywhere_falls_back_to_the_default(model_dir):
    (model_dir / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(model_dir)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"
