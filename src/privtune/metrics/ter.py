"""TER (translation edit rate), for DART: sacreBLEU's ``TER`` with its defaults (case-insensitive, no
normalisation), corpus level over a variable number of references per hypothesis (ragged lists padded
with ``None``, which sacreBLEU skips, as for BLEU). Scale 0-100 and beyond; lower is better. DART's
evaluation reports TER beside BLEU and METEOR (the DART release's evaluation scripts, which Li et al.'s
table-to-text README points to).
"""
from __future__ import annotations


def ter(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import TER

    n_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    return float(TER().corpus_score(hyps, streams).score)
