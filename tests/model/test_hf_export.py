"""The complete HF export: config.json with its own tokenizer's ids, tokenizer.json,
tokenizer_config.json and generation_config.json, loaded by transformers (AutoTokenizer,
AutoModelForCausalLM, pipeline) and by moray (generate, the serving engine), all stopping at eos."""

import json

import pytest
import torch

from moray.actors.engine import Engine, RequestParams, Tokenizer
from moray.model import Transformer, generate, load_pretrained, preset, save_pretrained
from moray.model.hf import DEFAULT_CHAT_TEMPLATE
from moray.platform.data_contract import SPECIAL_TOKENS, special_tokens_of
from tests.actors.engine_fixtures import train_tokenizer
from tests.model.hf_reference import transformers

PROMPT = "My lord, the king"
MAX_NEW = 16


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = train_tokenizer()  # the contract's special tokens first: <|bos|>=0, <|eos|>=1, <|pad|>=2
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(tokenizer_file))


def contract_config(tok):
    return preset("tiny").replace(vocab_size=tok.get_vocab_size(), **special_tokens_of(tok).model_fields())


def random_model(config, seed: int) -> Transformer:
    """Weights at a scale where greedy tokens are far from ties (the default init gives tiny logits)."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def stopping(tok, tokenizer_file, tmp_path_factory):
    """An export whose greedy continuation of PROMPT is k ordinary tokens and then eos.

    Greedy decoding of a random model gives tokens g0, g1, ...; swapping the lm_head rows of eos and
    the first new token t = g_k (k >= 2, neither t nor eos earlier) swaps only those two logits, so
    steps before k are unchanged and step k now picks eos."""
    config = contract_config(tok)
    model = random_model(config, seed=0)
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    free = generate(model, [prompt], max_new_tokens=MAX_NEW, stop_token_ids=(-1,))[0]
    eos = config.eos_token_id
    k = next(i for i in range(2, MAX_NEW) if free[i] not in free[:i] and eos not in free[: i + 1])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eos, free[k]]] = w[[free[k], eos]]
    path = save_pretrained(model, tmp_path_factory.mktemp("export") / "model", tokenizer=tokenizer_file)
    return path, prompt, free[:k] + [eos]


def test_export_files_carry_the_tokenizers_ids(stopping, tok):
    path = stopping[0]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    ids = {name: tok.token_to_id(text) for name, text in SPECIAL_TOKENS.items()}
    assert ids == {"bos": 0, "eos": 1, "pad": 2}  # the contract's order, not the tiny preset's (1, 2, 0)
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    for name, i in ids.items():
        assert config[f"{name}_token_id"] == generation[f"{name}_token_id"] == i
        assert tok_config[f"{name}_token"] == SPECIAL_TOKENS[name]
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["add_bos_token"] is False and tok_config["add_eos_token"] is False
    assert tok_config["model_max_length"] == config["max_position_embeddings"] == 1024
    assert tok_config["chat_template"] == DEFAULT_CHAT_TEMPLATE


def test_auto_tokenizer_loads_the_special_tokens(stopping):
    path = stopping[0]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_dir(path)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.model_max_length == 1024
    # no bos is prepended (as training saw documents and the engine encodes prompts)
    assert hf(PROMPT).input_ids == ours.encode(PROMPT) == stopping[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who goes there?"}]
    want = ours.apply_chat_template(messages)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert want == "<|system|>\nBe brief.\n<|user|>\nWho goes there?\n<|assistant|>\n"
    assert hf.decode([0, *stopping[1], 1, 2], skip_special_tokens=True) == ours.decode(stopping[1]) == PROMPT


def test_hf_generate_pipeline_moray_generate_and_engine_stop_at_eos(stopping):
    path, prompt, want = stopping
    eos = 1
    assert want[-1] == eos and eos not in want[:-1] and len(want) >= 3 and len(want) < MAX_NEW

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.generation_config.eos_token_id == eos and hf.generation_config.pad_token_id == 2
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    assert out[0, len(prompt) :].tolist() == want

    pipe = transformers.pipeline("text-generation", model=str(path))
    got = pipe(PROMPT, max_new_tokens=MAX_NEW, do_sample=False, return_tensors=True)
    assert got[0]["generated_token_ids"] == prompt + want
    text = pipe(PROMPT, max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False)
    tok = Tokenizer.from_dir(path)
    assert text[0]["generated_text"] == tok.decode(want[:-1])

    model = load_pretrained(path)
    assert generate(model, [prompt], max_new_tokens=MAX_NEW)[0] == want  # the config's eos
    assert tok.stop_token_ids == (eos,)
    assert generate(model, [prompt], max_new_tokens=MAX_NEW, stop_token_ids=tok.stop_token_ids)[0] == want

    engine = Engine(model, Tokenizer.from_dir(path, eos_token_id=model.config.eos_token_id))
    r = engine.add_request(prompt, RequestParams(max_tokens=MAX_NEW, temperature=0))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert r.output_ids == want and outs[-1].finish_reason == "stop"
    assert "".join(o.new_text for o in outs) == tok.decode(want[:-1])


def test_a_tokenizer_without_the_configs_ids_is_refused(tok, tokenizer_file, tmp_path):
    bigger = contract_config(tok).replace(vocab_size=1024, eos_token_id=700)
    with pytest.raises(ValueError, match=r"eos_token_id=700 .* no token of .*tokenizer\.json"):
        save_pretrained(Transformer(bigger), tmp_path / "a", tokenizer=tokenizer_file)
    assert not (tmp_path / "a").exists()  # refused before anything is written
    smaller = contract_config(tok).replace(vocab_size=256)
    with pytest.raises(ValueError, match=r"has 512 tokens, more than the model's vocab_size=256"):
        save_pretrained(Transformer(smaller), tmp_path / "b", tokenizer=tokenizer_file.parent)


def test_export_without_a_tokenizer_still_states_the_stop_ids(tmp_path):
    save_pretrained(Transformer(preset("tiny")), tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    assert not (tmp_path / "tokenizer_config.json").exists()
