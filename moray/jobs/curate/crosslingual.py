"""Cross-lingual alignment: documents paired with their translations, from the texts alone.

No translation or embedding model: every signal comes from the documents themselves.

1. Features per document: numbers (digit runs: "103.7" and "103,7" agree); words transliterated
   from Cyrillic, Greek and Devanagari to Latin (tables below), each reduced to a consonant
   skeleton ("Georgetown", "Джорджтаун" and "जॉर्जटाउन" all become "grgtn") whose character
   trigrams catch names and cognates; punctuation and quote structure; the length in characters.
2. Per language pair, a score matrix: the TF-IDF cosine of trigrams and numbers plus the
   similarity of structure, less a penalty on the length ratio (its typical value and spread per
   pair), each z-scored against the other candidates of its row and column. A ratio beyond
   `max_length_ratio` never pairs. A language pair with fewer than `min_anchors` confident pairs
   on these signals alone (mutual best, z >= 4, margin >= 1) is not parallel: never paired.
3. Groups: mutual best matches (combined z >= `min_score`, margin >= `min_margin`) join, the
   combined z of two groups being the sum of all their members' pairwise scores over its square
   root, so that a group's every language vouches for a newcomer (a pivot through English and
   the agreement of the others in one score); a group holds at most one document per language.
   Then each language's documents are re-assigned to the groups by one Hungarian assignment
   (scipy.optimize.linear_sum_assignment), which undoes chains of greedy mistakes.
4. Bootstrapped lexicon, `rounds` times: the pairs found are anchors; word stems (first 5
   letters of the transliteration) that co-occur across anchors (twice or more, Dice >= 0.3)
   are translations, and the cosine of documents carried through that lexicon joins the scores
   (cross-fitted, so that a wrong pair never vouches for itself); the typical length ratio is
   re-learnt from the anchors; the groups are formed again.

`pair_documents` sees texts and languages only. Ids are ground truth for `evaluate` (UD PUD ids
match across languages after the language prefix), never a signal. On the four parallel UD PUD
files (397 documents each) with the French, Spanish and Chinese UD files as distractors, every
language pair scores precision and recall >= 0.99 and no distractor is paired
(tests/jobs/curate/test_crosslingual.py). The stage gathers the kept documents of `domains` on
the driver (as the dedup stages gather their keys) and gives each paired row a `pair_id` shared
by its translation group; packing lays a group's documents out together (pack.py).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

# -- transliteration to Latin (for matching names and cognates, not for reading) ------------------

_CYRILLIC = dict(zip(
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяіїєґўјђћџљњ",
    "a b v g d e e zh z i i k l m n o p r s t u f kh ts ch sh shch - y - e yu ya i i ye g u j dj ch dzh lj nj".split(),
))  # fmt: skip
_CYRILLIC = {k: v.strip("-") for k, v in _CYRILLIC.items()}
_GREEK = dict(
    zip("αβγδεζηθικλμνξοπρσςτυφχψω", "a v g d e z i th i k l m n x o p r s s t y f ch ps o".split())
)
_DEV_CONSONANTS = dict(zip(
    "कखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसहऩऱळ",
    "k kh g gh n ch chh j jh n t th d dh n t th d dh n p ph b bh m y r l v sh sh s h n r l".split(),
))  # fmt: skip
_DEV_NUKTA = {"क": "q", "ख": "kh", "ग": "g", "ज": "z", "ड": "r", "ढ": "rh", "फ": "f"}
_DEV_VOWELS = dict(zip("अआइईउऊऋएऐओऔऑऍ", "a a i i u u ri e ai o au o e".split()))
_DEV_SIGNS = dict(zip("ािीुूृेैोौॉॅ", "a i i u u ri e ai o au o e".split()))
_VIRAMA, _NUKTA = "्", "़"
# the letters one by one (a Devanagari consonant with its vowel sign is a syllable: _DEV_SYLLABLE)
_LETTERS = str.maketrans({**_CYRILLIC, **_GREEK, **_DEV_VOWELS, "ं": "n", "ँ": "n",
                          **dict.fromkeys(["ः", "ऽ", "\u200c", "\u200d", _VIRAMA, _NUKTA, *_DEV_SIGNS], ""),
                          **dict(zip("०१२३४५६७८९٠١٢٣٤٥٦٧٨٩", "01234567890123456789"))})  # fmt: skip
_DEV_SYLLABLE = re.compile(f"([{''.join(_DEV_CONSONANTS)}])({_NUKTA})?([{''.join(_DEV_SIGNS)}{_VIRAMA}])?")
_COMBINING = re.compile("[\u0300-\u036f]")


def _syllable(m: re.Match) -> str:
    consonant, nukta, sign = m.groups()
    base = _DEV_NUKTA.get(consonant, _DEV_CONSONANTS[consonant]) if nukta else _DEV_CONSONANTS[consonant]
    if sign == _VIRAMA:
        return base
    return base + (_DEV_SIGNS[sign] if sign else "a")  # no sign: the inherent vowel


def transliterate(text: str) -> str:
    """Cyrillic, Greek and Devanagari letters -> Latin; Devanagari and Arabic-Indic digits -> ASCII;
    Latin diacritics stripped; anything else unchanged. Lowercase."""
    t = unicodedata.normalize("NFKD", text.lower())  # accents apart from their letters
    t = _DEV_SYLLABLE.sub(_syllable, t).translate(_LETTERS)
    return _COMBINING.sub("", t).replace("ß", "ss")


# digraphs first, then single letters: a coarse sound class per letter so that spellings of one
# name in different scripts meet (g/j/dzh; c/k/q/kh; s/z/sh/ch/ts; b/p/f/v; d/t)
_SKELETON_DIGRAPHS = [("tsch", "s"), ("shch", "s"), ("dzh", "g"), ("sch", "s"), ("dj", "g"), ("zh", "s"),
                      ("sh", "s"), ("ch", "s"), ("ts", "s"), ("tz", "s"), ("kh", "k"), ("ph", "b"),
                      ("th", "t"), ("ck", "k"), ("x", "ks")]  # fmt: skip
_SKELETON_LETTERS = str.maketrans("jqczpfvd", "gkksbbbt")
_W_BEFORE_VOWEL = re.compile(r"w(?=[aeiouy])")
_VOWELISH = re.compile(r"[aeiouyhwu]")
_WORD = re.compile(r"[^\W\d_]+")
_NUMBER = re.compile(r"\d+")


@functools.lru_cache(maxsize=1 << 17)
def skeleton(word: str) -> str:
    """A transliterated word -> its first letter and consonant classes, repeats collapsed."""
    w = word
    for a, b in _SKELETON_DIGRAPHS:
        w = w.replace(a, b)
    w = _W_BEFORE_VOWEL.sub("b", w).translate(_SKELETON_LETTERS)  # w: v before a vowel, else a vowel
    w = w[:1] + _VOWELISH.sub("", w[1:])
    return re.sub(r"(.)\1+", r"\1", w)


def features(text: str) -> tuple[dict[str, float], set[str], int]:
    """One document -> (cognate and number terms with counts, word stems, length in characters)."""
    t = transliterate(text)
    terms: dict[str, float] = {}
    stems: set[str] = set()
    for w in _WORD.findall(t):
        if len(w) >= 2:
            stems.add(w[:5])
        if len(w) >= 3:
            k = f"^{skeleton(w)}$"
            for i in range(len(k) - 2):
                terms["g" + k[i : i + 3]] = terms.get("g" + k[i : i + 3], 0.0) + 1.0
    for x in _NUMBER.findall(t):
        key = "#" + (x.lstrip("0") or "0")
        terms[key] = terms.get(key, 0.0) + 3.0  # a number is worth more than one trigram
        stems.add(key)
    return terms, stems, len(text)


# -- config -------------------------------------------------------------------------------------


@dataclass
class CrossLingualConfig:
    enabled: bool = True
    domains: list = field(default_factory=lambda: ["multilingual"])  # pairs are found within a domain
    # the languages to pair ("*": every language with at least `min_docs` documents in the domain);
    # a document's language is langid's prediction, or its source label when langid could not tell
    languages: list = field(default_factory=lambda: ["*"])
    min_docs: int = 20  # fewer documents in a language: too few to learn a lexicon from; not paired
    # per language and domain; past it, the rest (by uid) stay unpaired. Memory and time grow with
    # its square per language pair (dense score matrices): 2,000 x 2,000 is 16 MB a matrix
    max_docs: int = 2000
    min_score: float = 2.5  # combined z-score a document needs with a group to join it
    min_margin: float = 0.5  # over the next best candidate, on both sides, when groups first form
    max_length_ratio: float = 2.5  # characters, after the pair's typical ratio: beyond it, never a pair
    rounds: int = 3  # lexicon bootstrapping rounds after the first (cognates, numbers, structure only)
    # confident pairs (from names, numbers, structure, length) a language pair needs before it is
    # paired at all; then also the pairs needed to learn its lexicon and length ratio
    min_anchors: int = 12

    def __post_init__(self):
        if not isinstance(self.domains, list) or not all(isinstance(d, str) and d for d in self.domains):
            raise ValueError(f"domains={self.domains!r}: a list of domain names")
        if not isinstance(self.languages, list) or not all(isinstance(x, str) and x for x in self.languages):
            raise ValueError(f"languages={self.languages!r}: a list of language codes, or ['*'] for all")
        if "*" not in self.languages and len(set(self.languages)) < 2:
            raise ValueError(f"languages={self.languages!r}: pairing needs at least two languages (or '*')")
        if self.min_docs < 2:
            raise ValueError(f"min_docs={self.min_docs}: must be >= 2")
        if self.max_docs < self.min_docs:
            raise ValueError(f"max_docs={self.max_docs}: must be >= min_docs ({self.min_docs})")
        if not self.min_score > 0:
            raise ValueError(f"min_score={self.min_score}: must be > 0 (a z-score; 0 would pair noise)")
        if not self.min_margin >= 0:
            raise ValueError(f"min_margin={self.min_margin}: must be >= 0")
        if not self.max_length_ratio > 1:
            raise ValueError(f"max_length_ratio={self.max_length_ratio}: must be > 1")
        if not 0 <= self.rounds <= 10:
            raise ValueError(f"rounds={self.rounds}: must be in [0, 10]")
        if self.min_anchors < 2:
            raise ValueError(f"min_anchors={self.min_anchors}: must be >= 2")


# -- pairing ------------------------------------------------------------------------------------

# the structure of a text: sentence ends, quotes, brackets, ?, !, :, ;, commas, numbers, %/currency,
# spaced dashes (counts compared on a log scale)
_STRUCTURE = [re.compile(p) for p in (r"[.!?।]+(\s|$)", r"[\"“”«»„‘’]", r"[()\[\]]", r"\?", r"!", r":", r";",
                                      r",", r"\d+", r"[%$€£¥₹]", r"\s[-–—]\s")]  # fmt: skip
_W_STRUCTURE, _W_LENGTH = 0.75, 0.5  # weights of structure and length against cognates and lexicon
_SEED_Z, _SEED_MARGIN = 4.0, 1.0  # what makes a pair confident before any lexicon (see _seeds)
_COSINE_SPREAD = 0.02  # the least spread of cognate cosines a z-score is taken against (parallel: ~0.04)
_FOLDS = 3  # cross-fitting of the lexical score (see _lexical)


def structure(text: str) -> np.ndarray:
    return np.log1p([len(p.findall(text)) for p in _STRUCTURE])


class _Language:
    """One language's documents as matrices: TF-IDF rows of cognate trigrams and numbers over the
    shared vocabulary, binary rows of its word stems (those in 2 or more documents), log lengths
    and structure counts."""

    def __init__(self, idx: list[int], texts: list[str], vocab: dict[str, int]):
        from scipy import sparse

        feats = [features(t) for t in texts]
        self.idx = np.asarray(idx)
        self.n = len(idx)
        self._terms = ([r for r, f in enumerate(feats) for _ in f[0]],
                       [vocab.setdefault(k, len(vocab)) for f in feats for k in f[0]],
                       [c for f in feats for c in f[0].values()])  # fmt: skip
        df: dict[str, int] = {}
        for _, stems, _ in feats:
            for s in stems:
                df[s] = df.get(s, 0) + 1
        keep = {s: i for i, s in enumerate(sorted(s for s, d in df.items() if d >= 2))}
        pairs = [(r, keep[s]) for r, (_, stems, _) in enumerate(feats) for s in stems if s in keep]
        self.stems = sparse.csr_matrix(
            (np.ones(len(pairs), np.float32), ([p[0] for p in pairs], [p[1] for p in pairs])),
            shape=(self.n, max(len(keep), 1)),
        )
        sdf = np.asarray(self.stems.sum(0)).ravel()
        self.stem_idf = sparse.diags(np.log1p(self.n / np.maximum(sdf, 1)))
        self.log_len = np.log(np.maximum([f[2] for f in feats], 1)).astype(np.float64)
        self.structure = np.array([structure(t) for t in texts]).reshape(self.n, len(_STRUCTURE))
        # the cross-fitting fold of each document: from its text, so that the input order is no signal
        self.fold = np.array([hashlib.blake2b(t.encode(), digest_size=4).digest()[0] % _FOLDS for t in texts])
        self.terms = None

    def finish(self, width: int) -> None:
        """TF-IDF (idf within the language), rows of unit length, once the vocabulary is complete."""
        from scipy import sparse

        r, c, v = self._terms
        tf = sparse.csr_matrix((np.asarray(v, np.float64), (r, c)), shape=(self.n, width))
        tf.data = 1.0 + np.log(tf.data)
        idf = np.log1p(self.n / np.maximum(np.bincount(tf.indices, minlength=width), 1))
        tf = tf @ sparse.diags(idf)
        self.terms = _unit_rows(tf)


def _unit_rows(m):
    from scipy import sparse

    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel()) + 1e-9
    return sparse.diags(1.0 / norms) @ m


def _zscore(s: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Each entry against its row and its column: how far it stands out among the candidates. A
    row's (column's) spread is floored at the median one and at `floor`: a document with almost no
    features in common with any other (one number in a text of another script) must not stand out
    on that alone."""
    r_sd, c_sd = s.std(1, keepdims=True), s.std(0, keepdims=True)
    r = (s - s.mean(1, keepdims=True)) / (np.maximum(r_sd, max(np.median(r_sd), floor)) + 1e-9)
    c = (s - s.mean(0, keepdims=True)) / (np.maximum(c_sd, max(np.median(c_sd), floor)) + 1e-9)
    return (r + c) / 2


def _lexicon(a: _Language, b: _Language, anchors: list[tuple[int, int]]):
    """Stems that co-occur across anchor pairs (twice or more, Dice >= 0.3) are translations:
    a sparse (stems of a) x (stems of b) matrix of their Dice coefficients."""
    from scipy import sparse

    ai = a.stems[[i for i, _ in anchors]]
    bj = b.stems[[j for _, j in anchors]]
    co = (ai.T @ bj).tocoo()
    dice = 2 * co.data / (np.asarray(ai.sum(0)).ravel()[co.row] + np.asarray(bj.sum(0)).ravel()[co.col])
    ok = (co.data >= 2) & (dice >= 0.3)
    return sparse.csr_matrix((dice[ok], (co.row[ok], co.col[ok])), shape=(a.stems.shape[1], b.stems.shape[1]))


def _lexical(a: _Language, b: _Language, anchors: list[tuple[int, int]]) -> np.ndarray:
    """Each side's TF-IDF stems carried into the other's vocabulary through the lexicon and
    compared (cosine), both ways. Cross-fitted: the documents of `a` are scored in _FOLDS folds,
    each with a lexicon learnt from the anchors of the other folds, so that a wrong pair never
    vouches for itself."""
    wa, wb = a.stems @ a.stem_idf, b.stems @ b.stem_idf
    out = np.zeros((a.n, b.n))
    for f in range(_FOLDS):
        rows = np.flatnonzero(a.fold == f)
        if not len(rows):
            continue
        lex = _lexicon(a, b, [(i, j) for i, j in anchors if a.fold[i] != f])
        forward = _unit_rows(wa[rows] @ lex) @ _unit_rows(wb).T
        backward = _unit_rows(wa[rows]) @ _unit_rows(wb @ lex.T).T
        out[rows] = (forward + backward).toarray()
    return out


def _combined(rows: np.ndarray, cols: np.ndarray, scores: dict, impossible: dict) -> np.ndarray:
    """Groups x groups (arrays of a document index per language, -1 where none) -> the combined
    z-score of joining them: the sum of their members' pairwise scores over the square root of their
    number; -inf where they share a language or a member pair is impossible."""
    nl = rows.shape[1]
    tot = np.zeros((len(rows), len(cols)))
    cnt = np.zeros((len(rows), len(cols)))
    blocked = np.zeros((len(rows), len(cols)), bool)
    for c in range(nl):
        r = np.flatnonzero(rows[:, c] >= 0)
        if not len(r):
            continue
        for d in range(nl):
            k = np.flatnonzero(cols[:, d] >= 0)
            if not len(k):
                continue
            if c == d:
                blocked[np.ix_(r, k)] = True
                continue
            grid = np.ix_(rows[r, c], cols[k, d])
            tot[np.ix_(r, k)] += scores[(c, d)][grid]
            cnt[np.ix_(r, k)] += 1
            blocked[np.ix_(r, k)] |= impossible[(c, d)][grid]
    z = tot / np.sqrt(np.maximum(cnt, 1))
    z[blocked | (cnt == 0)] = -np.inf
    return z


def _agglomerate(sizes: list[int], scores: dict, impossible: dict, cfg: CrossLingualConfig) -> np.ndarray:
    """Singletons -> groups of at most one document per language. Per pair of languages (a, b), the
    groups holding a but not b meet those holding b but not a; mutual best matches with a combined
    z-score >= min_score and a margin >= min_margin over the next best (both sides) join, strongest
    first. Until no group joins another."""
    nl = len(sizes)
    groups = np.full((sum(sizes), nl), -1)
    groups[np.arange(len(groups)), np.repeat(np.arange(nl), sizes)] = np.concatenate(
        [np.arange(n) for n in sizes]
    )
    # a join across a language pair that can never pair holds that pair: no need to look
    pairs = [(a, b) for a, b in combinations(range(nl), 2) if not impossible[(a, b)].all()]
    while True:
        has = groups >= 0
        joins = []
        for a, b in pairs:
            x = np.flatnonzero(has[:, a] & ~has[:, b])
            y = np.flatnonzero(has[:, b] & ~has[:, a])
            if not len(x) or not len(y):
                continue
            z = _combined(groups[x], groups[y], scores, impossible)
            best_col, best_row = z.argmax(1), z.argmax(0)
            for i, j in enumerate(best_col):
                v = z[i, j]
                if best_row[j] != i or v < cfg.min_score:
                    continue
                second = max(np.partition(z[i], -2)[-2] if z.shape[1] > 1 else -np.inf,
                             np.partition(z[:, j], -2)[-2] if z.shape[0] > 1 else -np.inf)  # fmt: skip
                if v - second >= cfg.min_margin:
                    joins.append((float(v), int(x[i]), int(y[j])))
        joins.sort(key=lambda t: (-t[0], t[1], t[2]))
        used: set[int] = set()
        merged = []
        for _, i, j in joins:
            if i not in used and j not in used:
                used |= {i, j}
                merged.append(np.maximum(groups[i], groups[j]))
        if not merged:
            return groups
        groups = np.vstack([groups[[k for k in range(len(groups)) if k not in used]], np.array(merged)])


def _refine(groups: np.ndarray, sizes: list[int], scores: dict, impossible: dict, min_score: float,
            passes: int = 2) -> np.ndarray:  # fmt: skip
    """Per language in turn, its documents are taken out of their groups and put back by one global
    assignment (Hungarian) on the combined z-score with the rest of each group; a document below
    min_score with every group stays alone. Undoes the chains of swaps that greedy joins leave."""
    from scipy.optimize import linear_sum_assignment

    nl = len(sizes)
    for _ in range(passes):
        for k in range(nl):
            if all(impossible[(k, m)].all() for m in range(nl) if m != k):
                continue  # a language paired with none
            rest = groups.copy()
            rest[:, k] = -1
            rest = rest[(rest >= 0).any(1)]
            alone = np.full((sizes[k], nl), -1)
            alone[:, k] = np.arange(sizes[k])
            z = _combined(rest, alone, scores, impossible)
            r, c = linear_sum_assignment(np.where(np.isfinite(z), -z, 1e6))
            ok = z[r, c] >= min_score
            rest[r[ok], k] = c[ok]
            groups = np.vstack([rest, alone[np.setdiff1d(np.arange(sizes[k]), c[ok])]])
    return groups


@dataclass
class Pairing:
    """`group[i]`: the translation group of document i (-1: unpaired); `stats`: per language, the
    documents considered, and per language pair judged parallel, the pairs found."""

    group: list[int]
    stats: dict


def pair_documents(texts: list[str], langs: list[str], cfg: CrossLingualConfig | None = None) -> Pairing:
    """Documents (text, language) -> translation groups. Looks at the texts and languages only."""
    cfg = cfg or CrossLingualConfig()
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(langs):
        if lang and ("*" in cfg.languages or lang in cfg.languages):
            by_lang.setdefault(lang, []).append(i)
    by_lang = {k: v[: cfg.max_docs] for k, v in sorted(by_lang.items()) if len(v) >= cfg.min_docs}
    if len(by_lang) < 2:
        return Pairing([-1] * len(texts), {"languages": {k: len(v) for k, v in by_lang.items()}, "pairs": {}})
    vocab: dict[str, int] = {}
    docs = [_Language(v, [texts[i] for i in v], vocab) for v in by_lang.values()]
    for d in docs:
        d.finish(len(vocab))
    names, sizes = list(by_lang), [d.n for d in docs]
    pairs = list(combinations(range(len(docs)), 2))
    base, ratio, typical, parallel = {}, {}, {}, {}
    for a, b in pairs:
        cognate = _zscore((docs[a].terms @ docs[b].terms.T).toarray(), _COSINE_SPREAD)
        shape = np.zeros((docs[a].n, docs[b].n))
        for f in range(len(_STRUCTURE)):  # L1 distance of the structure counts, one feature at a time
            shape -= np.abs(docs[a].structure[:, f, None] - docs[b].structure[None, :, f])
        base[(a, b)] = (cognate + _W_STRUCTURE * _zscore(shape)).astype(np.float32)
        ratio[(a, b)] = (docs[a].log_len[:, None] - docs[b].log_len[None, :]).astype(np.float32)
        # before any pair is known, the typical length ratio is that of the two languages' medians
        typical[(a, b)] = (float(np.median(docs[a].log_len) - np.median(docs[b].log_len)), 0.5)
        s, impossible = _pair_scores(base[(a, b)], ratio[(a, b)], *typical[(a, b)], cfg.max_length_ratio)
        parallel[(a, b)] = len(_seeds(s, impossible)) >= cfg.min_anchors
    groups = None
    for _ in range(cfg.rounds + 1):
        scores, impossible = {}, {}
        for a, b in pairs:
            if not parallel[(a, b)]:  # too few confident pairs: not a parallel language pair
                scores[(a, b)] = np.zeros(base[(a, b)].shape, np.float32)
                impossible[(a, b)] = np.ones(base[(a, b)].shape, bool)
            else:
                s, (mu, sd) = base[(a, b)], typical[(a, b)]
                anchors = _anchors(groups, a, b)
                if len(anchors) >= cfg.min_anchors:
                    s = s + _zscore(_lexical(docs[a], docs[b], anchors))
                    r = np.array([ratio[(a, b)][i, j] for i, j in anchors])
                    mu = float(np.median(r))
                    sd = float(np.clip(1.4826 * np.median(np.abs(r - mu)), 0.1, 0.5))
                scores[(a, b)], impossible[(a, b)] = _pair_scores(
                    s, ratio[(a, b)], mu, sd, cfg.max_length_ratio
                )
            scores[(b, a)], impossible[(b, a)] = scores[(a, b)].T, impossible[(a, b)].T
        groups = _agglomerate(sizes, scores, impossible, cfg)
        groups = _refine(groups, sizes, scores, impossible, cfg.min_score)
    out = [-1] * len(texts)
    found = groups[(groups >= 0).sum(1) >= 2]
    found = found[np.lexsort(found.T[::-1])]  # a stable numbering
    for g, row in enumerate(found):
        for k, i in enumerate(row):
            if i >= 0:
                out[int(docs[k].idx[i])] = g
    # per language pair judged parallel (the others are never paired), the pairs found
    stats = {"languages": dict(zip(names, sizes)),
             "pairs": {f"{names[a]}-{names[b]}": int(((found[:, a] >= 0) & (found[:, b] >= 0)).sum())
                       for a, b in pairs if parallel[(a, b)]}}  # fmt: skip
    return Pairing(out, stats)


def _pair_scores(s: np.ndarray, ratio: np.ndarray, mu: float, sd: float, max_ratio: float):
    """Similarity less the length penalty, z-scored; and where the length ratio rules a pair out."""
    off = np.abs(ratio - mu)
    return _zscore(s - _W_LENGTH * off / sd).astype(np.float32), off > np.log(max_ratio)


def _seeds(z: np.ndarray, impossible: np.ndarray) -> list[tuple[int, int]]:
    """Mutual best pairs that stand far out (z >= _SEED_Z, _SEED_MARGIN over the next best): a
    language pair with fewer than min_anchors of them, before any lexicon, is not parallel."""
    z = np.where(impossible, -np.inf, z)
    if min(z.shape) < 2:
        return []
    best_col, best_row = z.argmax(1), z.argmax(0)
    second_row = np.partition(z, -2, axis=1)[:, -2]
    second_col = np.partition(z, -2, axis=0)[-2]
    return [(i, int(j)) for i, j in enumerate(best_col) if best_row[j] == i and z[i, j] >= _SEED_Z
            and z[i, j] - max(second_row[i], second_col[j]) >= _SEED_MARGIN]  # fmt: skip


def _anchors(groups: np.ndarray | None, a: int, b: int) -> list[tuple[int, int]]:
    if groups is None:
        return []
    both = groups[(groups[:, a] >= 0) & (groups[:, b] >= 0)]
    return [(int(i), int(j)) for i, j in zip(both[:, a], both[:, b])]


# -- ground truth and evaluation -----------------------------------------------------------------


def truth_key(doc_id: str | None, lang: str | None) -> str | None:
    """The id with its language prefix removed (`de_pud-ud-test/n01001` -> `pud-ud-test/n01001`),
    which parallel corpora such as UD PUD share across languages; None without a prefix."""
    if not doc_id or not lang:
        return None
    for sep in ("_", "-", "/", ":"):
        if doc_id.startswith(lang + sep):
            return doc_id[len(lang) + 1 :]
    return None


def evaluate(group: list[int], langs: list[str], keys: list[str | None]) -> dict:
    """Precision and recall of the pairs (two documents in one group) against ground-truth keys,
    per language pair, overall, and of whole groups (a group is right when it is exactly the set
    of documents sharing its key). Only documents with a key count; {} when no key is shared."""
    true: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            true.setdefault(k, []).append(i)
    true_groups = [sorted(v) for v in true.values() if len(v) >= 2]
    if not true_groups:
        return {}
    pred: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        if g >= 0 and keys[i] is not None:
            pred.setdefault(g, []).append(i)

    def pair_set(groups):
        out: dict[str, set] = {}
        for m in groups:
            for i, j in combinations(sorted(m, key=lambda x: (langs[x], x)), 2):
                out.setdefault(f"{langs[i]}-{langs[j]}" if langs[i] <= langs[j] else f"{langs[j]}-{langs[i]}",
                               set()).add((min(i, j), max(i, j)))  # fmt: skip
        return out

    tp, pp = pair_set(true_groups), pair_set(pred.values())
    per = {}
    for lp in sorted(set(tp) | set(pp)):
        t, p = tp.get(lp, set()), pp.get(lp, set())
        per[lp] = {"precision": len(t & p) / len(p) if p else 1.0, "recall": len(t & p) / len(t) if t else 1.0,
                   "true": len(t), "predicted": len(p)}  # fmt: skip
    t_all = set().union(*tp.values()) if tp else set()
    p_all = set().union(*pp.values()) if pp else set()
    exact_true = {tuple(m) for m in true_groups}
    exact_pred = {tuple(sorted(m)) for m in pred.values()}
    hit = len(exact_true & exact_pred)
    return {
        "pairs": {
            "precision": len(t_all & p_all) / len(p_all) if p_all else 1.0,
            "recall": len(t_all & p_all) / len(t_all) if t_all else 1.0,
        },  # fmt: skip
        "groups": {
            "precision": hit / len(exact_pred) if exact_pred else 1.0,
            "recall": hit / len(exact_true),
            "true": len(exact_true),
            "predicted": len(exact_pred),
        },  # fmt: skip
        "per_language_pair": per,
    }


# -- the stage (Ray Data) -------------------------------------------------------------------------


def group_id(uids: list[str]) -> str:
    """A translation group's id: a hash of its members' uids (stable whatever the order found)."""
    return "xl-" + hashlib.blake2b("\n".join(sorted(uids)).encode(), digest_size=8).hexdigest()


def document_language(lang_pred: str | None, lang: str | None) -> str | None:
    """langid's prediction; the source's label when langid could not tell (short text)."""
    if lang_pred and lang_pred != "und":
        return lang_pred
    return lang or None


def add_pair_ids(batch, pair_ids: dict[str, str]):
    """map_batches body (pyarrow): the `pair_id` column (null: unpaired), typed even when all null."""
    import pyarrow as pa

    ids = [pair_ids.get(u) for u in batch.column("uid").to_pylist()]
    if "pair_id" in batch.column_names:
        batch = batch.drop_columns(["pair_id"])
    return batch.append_column("pair_id", pa.array(ids, pa.string()))


def pair_rows(frame, cfg: CrossLingualConfig) -> tuple[dict[str, str], dict]:
    """Kept rows (uid, doc_id, domain, lang, lang_pred, text) -> ({uid: pair_id}, report data).
    Pairs per domain; doc_ids are only read afterwards, for precision and recall."""
    pair_ids: dict[str, str] = {}
    report: dict = {"documents": 0, "paired_documents": 0, "groups": 0, "group_sizes": {}, "per_domain": {}}
    for domain in sorted(set(frame["domain"])):
        part = frame[frame["domain"] == domain].sort_values("uid")
        uids, texts = part["uid"].tolist(), part["text"].tolist()
        langs = [document_language(p, s) for p, s in zip(part["lang_pred"], part["lang"])]
        result = pair_documents(texts, [x or "" for x in langs], cfg)
        members: dict[int, list[str]] = {}
        for u, g in zip(uids, result.group):
            if g >= 0:
                members.setdefault(g, []).append(u)
        for m in members.values():
            gid = group_id(m)
            pair_ids.update({u: gid for u in m})
            size = str(len(m))
            report["group_sizes"][size] = report["group_sizes"].get(size, 0) + 1
        # ground truth only: ids whose language prefix (the source's label first) leaves a shared key
        keys = [truth_key(d, s or p) for d, s, p in zip(part["doc_id"], part["lang"], part["lang_pred"])]
        info = {"documents": len(uids), "paired_documents": sum(g >= 0 for g in result.group),
                "groups": len(members), **result.stats}  # fmt: skip
        scores = evaluate(result.group, [x or "" for x in langs], keys)
        if scores:
            info["ground_truth"] = scores
        report["per_domain"][domain] = info
        for k in ("documents", "paired_documents", "groups"):
            report[k] += info[k]
    return pair_ids, report


def languages_to_pair(frame, cfg: CrossLingualConfig) -> dict[str, dict[str, int]]:
    """Kept rows (domain, outcome, lang, lang_pred) -> {domain: {language: documents}} for the
    domains of `cfg` where two or more of its languages have `min_docs` documents: where pairing
    can find anything. Empty: the stage does not run (no multilingual data)."""
    out: dict[str, dict[str, int]] = {}
    rows = frame[(frame["outcome"] == "kept") & frame["domain"].isin(cfg.domains)]
    for domain, lang_pred, lang in zip(rows["domain"], rows["lang_pred"], rows["lang"]):
        x = document_language(lang_pred, lang)
        if x and ("*" in cfg.languages or x in cfg.languages):
            out.setdefault(domain, {})[x] = out.setdefault(domain, {}).get(x, 0) + 1
    out = {d: {x: n for x, n in sorted(c.items()) if n >= cfg.min_docs} for d, c in sorted(out.items())}
    return {d: c for d, c in out.items() if len(c) >= 2}


def worth_running(ds, cfg: CrossLingualConfig) -> bool:
    """On, and some domain of `cfg` holds kept documents in two languages to pair."""
    from moray.jobs.curate.rows import columns

    return cfg.enabled and bool(
        languages_to_pair(columns(ds, ["domain", "outcome", "lang", "lang_pred"]), cfg)
    )


def stage(ds, cfg: CrossLingualConfig):
    """Rows -> rows with `pair_id`: the translation group of each paired kept document of
    `cfg.domains` (null for every other row), and the report data. The kept documents of those
    domains are gathered on the driver: pairing needs them all at once."""
    from moray.jobs.curate.rows import kept

    cols = ["uid", "doc_id", "domain", "lang", "lang_pred", "text"]
    frame = (
        ds.map_batches(kept, fn_kwargs={"domains": cfg.domains}, batch_format="pandas")
        .select_columns(cols)
        .to_pandas()
        .reindex(columns=cols)
    )
    pair_ids, report = pair_rows(frame, cfg)
    return ds.map_batches(add_pair_ids, fn_kwargs={"pair_ids": pair_ids}, batch_format="pyarrow"), report
