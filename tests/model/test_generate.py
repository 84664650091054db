import torch

from moray.model import SamplingParams, Transformer, generate, load_pretrained, preset
from tests.model.hf_reference import hf_model


def test_greedy_generation_matches_hf_generate(tmp_path):
    ref = hf_model(seed=11, q_lora_rank=16)
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    prompt = torch.randint(3, 256, (1, 12))
    want = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, 12:].tolist()
    got = generate(ours, prompt.tolist(), SamplingParams(max_new_tokens=20, stop_token_ids=(-1,)))[0]
    assert got == want


def test_batch_of_different_lengths_equals_one_by_one():
    model = Transformer(preset("tiny")).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(-1,))
    batched = generate(model, prompts, params)
    single = [generate(model, [p], params)[0] for p in prompts]
    assert batched == single
    assert all(len(x) == 10 for x in batched)


def test_sampling_is_seeded_and_respects_top_k():
    model = Transformer(preset("tiny")).eval()
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=5, top_p=0.9, seed=123, stop_token_ids=(-1,))
    a = generate(model, [[5, 6, 7]], p)
    b = generate(model, [[5, 6, 7]], p)
    c = generate(model, [[5, 6, 7]], SamplingParams(**{**p.__dict__, "seed": 7}))
    assert a == b and a != c


def test_stop_token_ends_a_row():
    model = Transformer(preset("tiny")).eval()
    first = generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=8, stop_token_ids=(-1,)))[0]
    stop = first[2]
    got = generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert got == first[: first.index(stop) + 1]
