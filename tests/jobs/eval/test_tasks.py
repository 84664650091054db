"""The tasks' rules against lm-evaluation-harness's own code where it has one (rolling windows, the
WikiText detokenizer, GSM8K's answer filters and exact match), the HumanEval estimator against its
closed form, and the scorer's shared-prefix grouping. No model here."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest

from moray.jobs.eval.requests import encode_pair, rolling_windows
from moray.jobs.eval.scorer import shared_prefixes
from moray.jobs.eval.tasks import gsm8k, humaneval, mmlu, wikitext

lm_eval = pytest.importorskip("lm_eval")


def test_rolling_windows_are_lm_evals():
    from lm_eval import utils

    rng = random.Random(0)
    for n in (1, 2, 5, 10, 11, 23, 100):
        for max_len in (1, 3, 10, 64):
            tokens = [rng.randrange(100) for _ in range(n)]
            want = [
                tuple(map(list, w))
                for w in map(
                    utils.make_disjoint_window, utils.get_rolling_token_windows(tokens, 999, max_len, 1)
                )
            ]
            got = rolling_windows(tokens, 999, max_len)
            assert got == want
            assert sum(len(pred) for _, pred in got) == n  # every token predicted exactly once


def test_encode_pair_moves_the_contexts_trailing_space_to_the_continuation():
    encode = lambda s: [ord(c) for c in s.replace("  ", "\x00")]  # merges across the boundary
    ctx, cont = encode_pair(encode, "Answer: ", "A")
    assert ctx == encode("Answer:") and cont == encode(" A")
    ctx, cont = encode_pair(encode, "x ", " y")  # "x" + "  y": the merged pair belongs to the continuation
    assert ctx == [ord("x")] and cont == [0, ord("y")]


def test_wikitext_articles_and_detokenizer(eval_data):
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    text = (eval_data / wikitext.FILE).read_text(encoding="utf-8")
    pages = wikitext.split_articles(text)
    assert len(pages) > 50
    assert all(wikitext._TITLE.match(p.splitlines()[0]) for p in pages)
    assert "".join(pages) == text[text.index(pages[0]) :]  # nothing dropped, nothing reordered
    for page in pages[:20]:
        assert wikitext.detokenize(page) == wikitext_detokenizer({"page": page})


def test_wikitext_metrics_add_up():
    docs = [{"page": " a b c \n"}, {"page": "d e"}]
    result = wikitext.Wikitext().score(docs, [[(-6.0, 3)], [(-4.0, 2)]])
    words = [len(p["page"].split()) + 2 for p in docs[:1]] + [2]  # lm-eval counts the empty ends too
    assert [s["words"] for s in result.samples] == words
    assert result.metrics["word_perplexity"] == pytest.approx(math.exp(10 / sum(words)))
    assert result.metrics["byte_perplexity"] == pytest.approx(math.exp(10 / (8 + 3)))
    assert result.metrics["token_perplexity"] == pytest.approx(math.exp(10 / 5))
    assert result.metrics["bits_per_byte"] == pytest.approx(10 / 11 / math.log(2))


@pytest.mark.parametrize(
    "text",
    [
        "She has 5 apples. The answer is 18.\n\n",
        "The answer is 1,234.",
        "So $18 in total, then 20 and 7. The answer is $18.",
        "The answer is -3.5. Also 12",
        "no number here",
        "1 2 3 4 5",
        "The total is $2,000.",
    ],
)
def test_gsm8k_filters_and_exact_match_are_lm_evals(text):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(gsm8k.STRICT.pattern).apply([[text]], [{}])[0][0]
    flexible = RegexFilter(gsm8k.FLEXIBLE.pattern, group_select=-1).apply([[text]], [{}])[0][0]
    assert gsm8k.extract(text) == {"strict": strict, "flexible": flexible}
    for gold in ("18", "1234", "2000", "#### 18"):
        for found in (strict, flexible):
            want = exact_match_hf_evaluate(
                [found], [gold], regexes_to_ignore=list(gsm8k.IGNORE), ignore_case=True
            )
            assert float(gsm8k.normalize(found) == gsm8k.normalize(gsm8k.target(gold))) == want["exact_match"]


def test_gsm8k_prompt_is_the_eight_cot_shots_then_the_question():
    p = gsm8k.prompt("How many?")
    assert p.count("Q: ") == 9 and p.endswith("Q: How many?\nA:")
    assert p.startswith("Q: There are 15 trees in the grove.")


def test_pass_at_k_is_the_unbiased_estimator():
    assert humaneval.pass_at_k(1, 1, 1) == 1.0 and humaneval.pass_at_k(10, 0, 1) == 0.0
    assert humaneval.pass_at_k(2, 1, 1) == pytest.approx(0.5)
    for n, c, k in ((10, 3, 1), (10, 3, 5), (20, 1, 10), (5, 4, 2)):
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_humaneval_scores_canonical_solutions_as_passing_and_stubs_as_failing(eval_data):
    task = humaneval.HumanEval()
    docs = task.load(eval_data, limit=3)
    with gzip.open(eval_data / humaneval.FILE, "rt") as f:
        canonical = [json.loads(line)["canonical_solution"] for line, _ in zip(f, range(3))]
    good = task.score(docs, [[[c]] for c in canonical])
    assert good.metrics["pass_at_1"] == 1.0 and all(s["status"] == ["passed"] for s in good.samples)
    bad = task.score(docs, [[["    return None\n"]] for _ in docs])
    assert bad.metrics["pass_at_1"] == 0.0 and all(s["status"] == ["failed"] for s in bad.samples)


def test_mmlu_reads_every_subject_and_refuses_a_malformed_row(eval_data, tmp_path):
    assert len(mmlu.subjects(eval_data)) == 57
    docs = mmlu.MMLU().load(eval_data, limit=1)
    assert len(docs) == 57 and all(len(d["shots"]) == 5 and d["answer"] in range(4) for d in docs)
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"x_test.csv, row 1: expected question, 4 choices and a letter"):
        mmlu.read_split(tmp_path, "x", "test")


def test_shared_prefixes_group_neighbours_and_stop_before_needed_logits():
    a = tuple(range(300)) + (1, 2)
    b = tuple(range(300)) + (3, 4, 5)
    c = tuple(range(1000, 1300))
    d = tuple(range(200)) + (9,)  # shares 200 with a and b, but they share 300
    inputs = sorted([a, b, c, d])
    needed = {a: len(a) - 1, b: len(b) - 1, c: len(c) - 1, d: len(d) - 1}
    groups = shared_prefixes(inputs, needed, min_len=128)
    assert [(len(p), sorted(g)) for p, g in groups] == [(200, sorted([a, b, d])), (0, [c])]
    needed[a] = 150  # a continuation of a needs logits from position 150 on: the prefix ends there
    assert [len(p) for p, _ in shared_prefixes(inputs, needed, 128)] == [150, 0]
    needed[a] = 100  # too short a prefix to share: every input on its own
    assert shared_prefixes(inputs, needed, 128) == [((), inputs)]
