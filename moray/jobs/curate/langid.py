"""Language identification with py3langid (langid.py's model, shipped inside the package: offline).

Each document gets `lang_pred` and a normalized probability. A document outside its domain's
allowed languages is filtered (`langid:de` says what it was). Labels a source already carries
(the `lang` field of the UD files) are kept; `accuracy()` measures the model against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_IDENTIFIER = None


@dataclass
class LangIdConfig:
    enabled: bool = True
    min_chars: int = 20  # shorter texts are too short to judge: they pass as "und"
    max_chars: int = 5000  # classify a prefix: the model is linear in the text length
    min_score: float = 0.8  # a less confident prediction does not filter (short technical text)
    # allowed languages per domain; "*" allows all; a domain not listed gets `default`
    allowed: dict = field(default_factory=lambda: {"multilingual": ["*"], "code": ["*"], "default": ["en"]})


def identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def predict(text: str, cfg: LangIdConfig) -> tuple[str, float]:
    if len(text) < cfg.min_chars:
        return "und", 0.0
    lang, score = identifier().classify(text[: cfg.max_chars])
    return lang, float(score)


def check(domain: str, lang: str, score: float, cfg: LangIdConfig) -> str:
    """The filter reason, or "" to keep."""
    allowed = cfg.allowed.get(domain, cfg.allowed.get("default", ["*"]))
    if "*" in allowed or lang == "und" or lang in allowed or score < cfg.min_score:
        return ""
    return f"langid:{lang}"


def accuracy(labelled: list[tuple[str, str]], cfg: LangIdConfig | None = None) -> dict:
    """[(text, true_lang)] -> overall and per-language accuracy."""
    cfg = cfg or LangIdConfig(min_chars=0)
    return accuracy_on_labels((truth, predict(text, cfg)[0]) for text, truth in labelled)


def accuracy_on_labels(pairs) -> dict:
    """(true_lang, predicted) pairs -> overall and per-language accuracy; pairs missing either side
    (no label, or the record never reached language id) are skipped. Empty dict when none is left."""
    per: dict[str, list[int]] = {}
    for truth, pred in pairs:
        if truth and pred:
            per.setdefault(truth, [0, 0])
            per[truth][0] += int(pred == truth)
            per[truth][1] += 1
    total = sum(v[1] for v in per.values())
    if not total:
        return {}
    return {
        "accuracy": sum(v[0] for v in per.values()) / total,
        "n": total,
        "per_language": {k: v[0] / v[1] for k, v in sorted(per.items())},
    }
