"""Evaluation wall time: `moray eval` (Ray actor, moray's model) vs lm-evaluation-harness 0.4
(`hf` backend: transformers' DeepseekV2ForCausalLM, its own task YAMLs) on the same tasks, documents,
exported model and machine.

The model: the `small` preset's shapes (hidden 512, 4 layers, 64 routed experts, top-6) with random
weights, a 4,096-token BPE trained on a corpus text, a 2,048-token context, exported as an HF
directory. The tasks: MMLU 5-shot (16 questions of every 4th subject: 240 questions of 15 subjects; the
full set averages 246 questions a subject, each subject's questions sharing one 5-shot prefix), WikiText-2 perplexity
(the first 4 articles) and GSM8K chain of thought (8 questions, 64 new tokens). HumanEval runs on
moray's side only: lm-eval's HumanEval loads its metric from the Hugging Face Hub, which this
machine cannot reach. Both sides' times include loading the model; moray's includes starting its
Ray actor. The same MMLU answers on both sides are checked, and the largest log-likelihood gap and
the perplexity gap are printed. Target: moray at least 3x faster.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from common import THREADS, Result, setup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures.lm_eval_reference, tests.actors.engine_fixtures

DATA = ROOT.parent / "shared" / "data" / "eval"
MMLU_PER_SUBJECT = 16
MMLU_SUBJECT_STEP = 4  # every 4th subject: 15 of the 57
WIKITEXT_DOCS = 4
GSM8K_DOCS = 8
GEN_TOKENS = 64
TARGET = 3.0


def export_model(path: Path) -> Path:
    from moray.model import Transformer, preset, save_pretrained
    from moray.platform.data_contract import special_tokens_of
    from tests.actors.engine_fixtures import train_tokenizer

    tok = train_tokenizer(vocab_size=4096)
    tok.save(str(path / "tokenizer.json"))
    config = preset("small").replace(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=2048, **special_tokens_of(tok).model_fields()
    )
    model = Transformer(config).eval()
    with torch.no_grad():  # peaky enough that argmaxes (MMLU's answers) are far from ties
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return save_pretrained(model, path / "model", tokenizer=path / "tokenizer.json")


def mmlu_subjects() -> list[str]:
    from moray.jobs.eval.tasks.mmlu import subjects

    return subjects(DATA)[::MMLU_SUBJECT_STEP]


def run_moray(model_dir: Path) -> tuple[dict, float]:
    from moray.jobs.eval.config import EvalConfig
    from moray.jobs.eval.job import evaluate

    config = EvalConfig(
        model=str(model_dir), tasks=("mmlu", "wikitext", "gsm8k"), limit=None, data_dir=DATA, threads=THREADS,
        max_gen_tokens={"gsm8k": GEN_TOKENS},
    )  # fmt: skip
    # the same documents as lm-eval's side: limits differ per task, so load each task's own slice
    import moray.jobs.eval.job as job

    load = job.build_tasks

    def sliced(cfg):
        tasks = load(cfg)
        limits = {"mmlu": MMLU_PER_SUBJECT, "wikitext": WIKITEXT_DOCS, "gsm8k": GSM8K_DOCS}
        for name, task in tasks.items():
            task.load = (lambda f, n: lambda data_dir, limit: f(data_dir, n))(task.load, limits[name])
        mmlu_load = tasks["mmlu"].load
        chosen = set(mmlu_subjects())
        tasks["mmlu"].load = lambda data_dir, limit: [
            d for d in mmlu_load(data_dir, limit) if d["subject"] in chosen
        ]
        return tasks

    job.build_tasks = sliced
    try:
        t0 = time.perf_counter()
        results = evaluate(config, model_dir)
        return results, time.perf_counter() - t0
    finally:
        job.build_tasks = load


def run_lm_eval(model_dir: Path) -> tuple[dict, float]:
    from moray.jobs.eval.tasks.gsm8k import GSM8K
    from moray.jobs.eval.tasks.mmlu import read_split
    from moray.jobs.eval.tasks.wikitext import Wikitext
    from tests.fixtures import lm_eval_reference as ref

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        configs = []
        for s in mmlu_subjects():
            files = {
                "test": ref._write_jsonl(
                    root / s / "test.jsonl", read_split(DATA, s, "test")[:MMLU_PER_SUBJECT]
                ),
                "dev": ref._write_jsonl(root / s / "dev.jsonl", read_split(DATA, s, "dev")),
            }
            configs.append(ref.mmlu_task_config(s, files))
        wiki = Wikitext().load(DATA, WIKITEXT_DOCS)
        configs.append(ref.wikitext_task_config({"test": ref._write_jsonl(root / "wiki.jsonl", wiki)}))
        gsm = GSM8K().load(DATA, GSM8K_DOCS)
        configs.append(ref.gsm8k_task_config({"test": ref._write_jsonl(root / "gsm.jsonl", gsm)}, GEN_TOKENS))
        t0 = time.perf_counter()
        results = ref.run_lm_eval(
            model_dir, configs, batch_size=8, num_fewshot=None, cache_dir=root / "cache"
        )
        return results, time.perf_counter() - t0


def main() -> list[Result]:
    setup()
    from moray.platform.cluster import connect

    connect(num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(Path(tmp))
        ours, t_ours = run_moray(model_dir)
        theirs, t_theirs = run_lm_eval(model_dir)

    mmlu_ref = {
        name.removeprefix("mmlu_"): ss for name, ss in theirs["samples"].items() if name.startswith("mmlu_")
    }
    ref_acc = sum(float(s["acc"]) for ss in mmlu_ref.values() for s in ss) / sum(map(len, mmlu_ref.values()))
    ours_mmlu = ours["tasks"]["mmlu"]
    gap, seen = 0.0, {}
    for sample in ours["samples"]["mmlu"]:  # subject by subject, each in file order, as lm-eval's doc_ids
        i = seen[sample["subject"]] = seen.get(sample["subject"], -1) + 1
        theirs_lls = [float(ll) for ll, _ in mmlu_ref[sample["subject"]][i]["filtered_resps"]]
        gap = max(gap, max(abs(a - b) for a, b in zip(sample["loglikelihoods"], theirs_lls)))
    wiki_ref = theirs["results"]["wikitext"]["word_perplexity,none"]
    wiki_ours = ours["tasks"]["wikitext"]["word_perplexity"]
    print(f"  moray: {t_ours:.1f} s   lm-eval: {t_theirs:.1f} s   (MMLU {ours_mmlu['questions']} questions, "
          f"WikiText {WIKITEXT_DOCS} articles, GSM8K {GSM8K_DOCS} x {GEN_TOKENS} tokens)")  # fmt: skip
    print(f"  moray's time by part: {', '.join(f'{k} {v:.1f} s' for k, v in ours['seconds'].items())}")
    print(
        f"  MMLU accuracy: moray {ours_mmlu['acc']:.4f}, lm-eval {ref_acc:.4f}; largest log-likelihood gap {gap:.2e}"
    )
    print(f"  WikiText word perplexity: moray {wiki_ours:.4f}, lm-eval {wiki_ref:.4f} "
          f"({abs(wiki_ours / wiki_ref - 1):.2e} apart)")  # fmt: skip
    assert ours_mmlu["acc"] == ref_acc, "MMLU accuracy differs from lm-eval's"
    ratio = t_theirs / t_ours
    return [
        Result(
            "eval wall time: lm-eval / moray (small)", ratio, TARGET, f"{t_ours:.0f} s vs {t_theirs:.0f} s"
        )
    ]


if __name__ == "__main__":
    for r in main():
        print(f"{r.name}: {r.ratio:.2f}x (target {r.target}x) {r.status}")
