"""CIDEr (pycocoevalcap ``Cider``, not CIDEr-D) on PTB-tokenised text.

IDF over the corpus references, so a one-segment corpus scores 0. Raw scale, typically ~2
on E2E.
"""
from __future__ import annotations


def cider(gts: dict, res: dict) -> float:
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(gts, res)[0])
