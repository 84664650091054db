"""The data contract end to end, on a real curation output (a slice of ../shared/data, not a
hand-made fixture): curate, pre-train a few steps, export; then the special-token ids agree
everywhere (manifest, config.json, tokenizer files, generation_config.json, transformers, the
serving engine's stop set) and generation ends where eos is produced, in moray and in transformers.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moray.platform.data_contract import SPECIAL_TOKENS, read_manifest


def test_the_registered_version_carries_its_lineage(trained):
    """Curation -> pre-training -> registry: the version names the curation run (found by the
    manifest's checksum), the pre-training run and the resolved config; the curation run names the
    output the pre-training read."""
    import mlflow

    from moray.platform.files import sha256_file
    from moray.platform.registry import model_version

    data, _, summary = trained
    client = mlflow.MlflowClient(summary["tracking_uri"])
    version = model_version(client, summary["registered_model"])
    tags = version.tags
    assert tags["moray.lineage.pretrain_run"] == summary["mlflow_run_id"] == version.run_id
    assert tags["moray.data.manifest_sha256"] == sha256_file(data / "manifest.json")
    # the curation run that wrote this manifest, found by its checksum (other tests of the session
    # may rewrite the shared output's manifest after it was curated: then no run matches, none is named)
    experiments = [e.experiment_id for e in client.search_experiments()]
    writers = client.search_runs(experiments, f"tags.`moray.data.manifest_sha256` = '{sha256_file(data / 'manifest.json')}' "
                                 "and tags.`moray.job` = 'curate'")  # fmt: skip
    assert tags.get("moray.lineage.curation_run") == (writers[0].info.run_id if writers else None)
    if writers:
        assert writers[0].data.tags["moray.data.path"] == str(data)
        assert (
            client.get_run(summary["mlflow_run_id"]).data.tags["moray.lineage.curation_run"]
            == writers[0].info.run_id
        )
    config = json.loads(tags["moray.lineage.config"])
    assert (config["data"]["path"], config["train"]["max_steps"], config["run"]["name"]) == (
        str(data),
        3,
        "contract",
    )


def test_special_token_ids_agree_everywhere(trained):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    from moray.actors.engine import Engine
    from moray.jobs.serve.loading import load_for_serving

    data, export, _ = trained
    manifest = read_manifest(data)
    ids = manifest.special_tokens.as_dict()  # {"bos": 0, "eos": 1, "pad": 2} for a curated tokenizer
    # the curated tokenizer reserves the contract's tokens, and its ids differ from the tiny preset's
    assert ids == {"bos": 0, "eos": 1, "pad": 2}

    config = json.loads((export / "config.json").read_text())
    assert {k: config[f"{k}_token_id"] for k in ids} == ids
    assert config["vocab_size"] == manifest.vocab_size

    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    assert {k: tok.id_to_token(i) for k, i in ids.items()} == SPECIAL_TOKENS

    tok_config = json.loads((export / "tokenizer_config.json").read_text())
    assert {k: tok_config[f"{k}_token"] for k in ids} == SPECIAL_TOKENS
    assert tok_config.get("chat_template")

    gen = GenerationConfig.from_pretrained(export)
    assert (gen.bos_token_id, gen.pad_token_id) == (ids["bos"], ids["pad"])
    assert gen.eos_token_id in (ids["eos"], [ids["eos"]])

    hf_tok = AutoTokenizer.from_pretrained(export)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        ids["bos"],
        ids["eos"],
        ids["pad"],
    )

    model, engine_tok, _ = load_for_serving(str(export))
    engine = Engine(model, engine_tok)
    assert engine.stop_ids == {ids["eos"]}


def _force_eos_after(export: Path, dst: Path, trigger: int, then: int, eos: int) -> Path:
    """A copy of the export whose greedy continuation of `trigger` is `then`, and of `then` is eos:
    a large value in one embedding column of the token dominates the final RMSNorm's output at its
    position, and the output head reads that column."""
    import shutil

    shutil.copytree(export, dst)
    weights = load_file(str(dst / "model.safetensors"))
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    embed[trigger, 1] = 50.0
    head[then, 1] = 10.0
    embed[then, 0] = 50.0
    head[eos, 0] = 10.0
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_generation_ends_where_eos_is_produced(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from moray.actors.engine import Engine, RequestParams
    from moray.jobs.serve.loading import load_for_serving
    from moray.model import SamplingParams, generate, load_pretrained

    data, export, _ = trained
    eos = read_manifest(data).special_tokens.eos
    hf_tok = AutoTokenizer.from_pretrained(export)
    # The prompt as the pipeline will tokenize its text, so every path sees the same ids; the
    # forced continuation is a token with visible text.
    text = "The council will review the spending"
    prompt = hf_tok(text)["input_ids"]
    trigger = prompt[-1]
    then = next(t for t in range(3, 512) if t not in prompt and hf_tok.decode([t]).strip())
    forced = _force_eos_after(export, tmp_path / "forced", trigger, then, eos)

    # moray's generate: the new tokens are `then`, then eos, and nothing after
    ours = generate(load_pretrained(forced), [prompt], SamplingParams(max_new_tokens=16))[0]
    assert ours == [then, eos]

    # transformers: generate and pipeline("text-generation") stop there too
    hf = AutoModelForCausalLM.from_pretrained(forced, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert out[0, len(prompt) :].tolist() == [then, eos]
    generated = pipeline("text-generation", model=hf, tokenizer=hf_tok)(
        text, max_new_tokens=16, do_sample=False, return_full_text=False
    )[0]["generated_text"]
    assert generated == hf_tok.decode([then])

    # the serving engine: finishes with reason "stop" after `then`; eos is not part of the text
    model, engine_tok, _ = load_for_serving(str(forced))
    engine = Engine(model, engine_tok)
    engine.add_request(prompt, RequestParams(max_tokens=16))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert outputs[-1].finish_reason == "stop"
    assert [t for o in outputs for t in o.new_token_ids][:1] == [then]
    assert outputs[-1].num_output_tokens == 2
