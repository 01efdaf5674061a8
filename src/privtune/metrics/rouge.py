"""ROUGE-L: pycocoevalcap's ``Rouge`` on PTB-tokenised text, or without Java the rouge-score fallback.

pycocoevalcap: LCS F-measure with beta=1.2, max precision and max recall over references,
averaged over segments. Fallback: ``RougeScorer(['rougeL'])`` F-measure, beta=1, its own
lower-casing alphanumeric tokenisation, max over references, averaged; close to but not
identical with the official value. Scale 0-100.
"""
from __future__ import annotations


def rouge_l(gts: dict, res: dict) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    return 100.0 * float(Rouge().compute_score(gts, res)[0])


def rouge_l_fallback(hyps: list[str], refs: list[list[str]]) -> float:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    total = 0.0
    for h, rs in zip(hyps, refs):
        total += max(scorer.score(r, h)["rougeL"].fmeasure for r in rs)
    return 100.0 * total / len(hyps)
