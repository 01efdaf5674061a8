"""BLEU as the official E2E script computes it (mteval-v13a through sacreBLEU).

sacreBLEU ``corpus_bleu``: 13a tokenisation, *lower-cased* (mteval-v13a's default; the E2E
script does not pass ``-c``), closest-reference brevity penalty and exp smoothing of zero
n-gram counts. Ragged reference lists are padded with ``None``, which sacreBLEU skips (an
empty string would be counted as a length-0 reference). Scale 0-100.
"""
from __future__ import annotations


def bleu(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    n_streams = max(len(r) for r in refs)
    # transpose into reference streams of equal length; None marks a missing reference
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    bleu = BLEU(lowercase=True, tokenize="13a")
    return float(bleu.corpus_score(hyps, streams).score)
