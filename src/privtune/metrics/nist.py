"""NIST-5 re-implemented after mteval-v13a (``nist_score``).

Information weights from n-gram counts over *all* references of the corpus, hits clipped by
the maximum count over a hypothesis's references, length penalty against the average
reference length (per segment, so ragged lists are handled). Same 13a tokenisation and
lower-casing as BLEU. Raw scale, typically ~8 on E2E. (NLTK's ``corpus_nist`` is not used:
with several references it scores against the single best reference, unlike mteval.)
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

NIST_MAX_NGRAM = 5


def _mteval_tokenize(sentence: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    global _TOK13A
    if _TOK13A is None:
        _TOK13A = Tokenizer13a()
    return _TOK13A(sentence.lower()).split()


_TOK13A = None


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter:
    c: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            c[tuple(tokens[i : i + n])] += 1
    return c


def nist(hyps: list[str], refs: list[list[str]], max_n: int = NIST_MAX_NGRAM) -> float:
    """Corpus NIST after mteval-v13a (module docstring)."""
    hyp_toks = [_mteval_tokenize(h) for h in hyps]
    ref_toks = [[_mteval_tokenize(r) for r in rs] for rs in refs]

    # information weights: info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)),
    # counts over every reference of the corpus, count(empty prefix) = #reference words
    ref_counts: Counter = Counter()
    ref_words = 0
    ref_ngrams = []
    for rs in ref_toks:
        per_seg = []
        for r in rs:
            c = _ngram_counts(r, max_n)
            ref_counts.update(c)
            ref_words += len(r)
            per_seg.append(c)
        ref_ngrams.append(per_seg)

    def info(g: tuple) -> float:
        prefix = ref_counts[g[:-1]] if len(g) > 1 else ref_words
        return math.log2(prefix / ref_counts[g])

    hit_info = [0.0] * max_n
    hyp_ngrams_total = [0] * max_n
    sys_len = 0
    avg_ref_len = 0.0
    for h, rs, rcounts in zip(hyp_toks, ref_toks, ref_ngrams):
        sys_len += len(h)
        avg_ref_len += sum(len(r) for r in rs) / len(rs)
        for n in range(1, max_n + 1):
            hyp_ngrams_total[n - 1] += max(0, len(h) - n + 1)
        max_ref: dict = {}
        for c in rcounts:
            for g, k in c.items():
                if k > max_ref.get(g, 0):
                    max_ref[g] = k
        for g, k in _ngram_counts(h, max_n).items():
            m = min(k, max_ref.get(g, 0))
            if m:
                hit_info[len(g) - 1] += info(g) * m

    score = sum(hit_info[n] / max(hyp_ngrams_total[n], 1) for n in range(max_n))
    ratio = sys_len / avg_ref_len if avg_ref_len > 0 else 0.0
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        beta = -math.log(0.5) / math.log(1.5) ** 2
        penalty = math.exp(-beta * math.log(ratio) ** 2)
    return float(score * penalty)
