"""WikiText-2 perplexity: lm-eval's `wikitext` task (lm_eval/tasks/wikitext/wikitext.yaml).

Each article is one document, scored as a whole by rolling windows of the model's context
(`loglikelihood_rolling`) after lm-eval's detokenizer; words and bytes are counted on the article
as stored. Word-, byte- and token-level perplexity, and bits per byte."""

from __future__ import annotations

import math
import re
from pathlib import Path

from moray.jobs.eval.requests import Rolling
from moray.jobs.eval.tasks import TaskResult

FILE = "wikitext-2-test.txt"
_TITLE = re.compile(r"^ = [^=].* = $")  # " = Robert Boulter = ": an article's first line


def split_articles(text: str) -> list[str]:
    """The articles of a WikiText file, each from its title line to the next title, lines kept whole."""
    pages: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    return ["".join(p) for p in pages if "".join(p).strip()]


def detokenize(page: str) -> str:
    """lm-eval's `wikitext_detokenizer` (preprocess_wikitext.py), rule for rule."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


class Wikitext:
    name = "wikitext"
    kind = "loglikelihood"
    files = (FILE,)

    def load(self, data_dir: Path, limit: int | None) -> list[dict]:
        pages = split_articles((Path(data_dir) / FILE).read_text(encoding="utf-8"))
        return [{"page": p} for p in pages[:limit]]

    def requests(self, doc: dict) -> list:
        return [Rolling(detokenize(doc["page"]))]

    def score(self, docs: list[dict], answers: list[list]) -> TaskResult:
        samples = []
        for doc, ((ll, n_tokens),) in zip(docs, answers):
            words = len(re.split(r"\s+", doc["page"]))  # lm-eval counts on the article before detokenizing
            samples.append(
                {"loglikelihood": ll, "words": words, "bytes": len(doc["page"].encode()), "tokens": n_tokens}
            )
        ll = sum(s["loglikelihood"] for s in samples)
        words, nbytes, tokens = (sum(s[k] for s in samples) for k in ("words", "bytes", "tokens"))
        metrics = {
            "word_perplexity": math.exp(-ll / words),
            "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2),
            "token_perplexity": math.exp(-ll / tokens),
            "documents": len(samples),
            "tokens": tokens,
        }
        return TaskResult(metrics, samples)
