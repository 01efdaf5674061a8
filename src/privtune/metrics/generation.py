"""Generation metrics: the official E2E NLG Challenge evaluation, one module per metric.

:func:`generation_metrics` computes corpus-level scores with a variable number of
references per hypothesis, following the official E2E NLG Challenge evaluation script
(``tuetschek/e2e-metrics``, ``measure_scores.py``), which runs NIST mteval-v13a for
BLEU/NIST and the MS-COCO caption scorers (``pycocoevalcap``) for METEOR, ROUGE-L and
CIDEr.  Scales are those in which papers report E2E results (BLEU on 0-100):

=========  ========  ===================================================================
metric     scale     implementation
=========  ========  ===================================================================
bleu       0-100     sacreBLEU ``corpus_bleu``: mteval-13a tokenisation, *lower-cased*
                     (mteval-v13a's default; the E2E script does not pass ``-c``),
                     closest-reference brevity penalty and exp smoothing of zero n-gram
                     counts (mteval-v13a's default ``bleu_score``).  Ragged reference
                     lists are padded with ``None``, which sacreBLEU skips (an empty
                     string would be counted as a length-0 reference).
nist       raw       NIST-5 re-implemented after mteval-v13a (``nist_score``):
                     information weights from n-gram counts over *all* references of the
                     corpus, hits clipped by the maximum count over a hypothesis's
                     references, length penalty against the average reference length
                     (per segment, so ragged lists are handled).  Same 13a tokenisation
                     and lower-casing as BLEU.  Typically ~8 on E2E.  (NLTK's
                     ``corpus_nist`` is not used: with several references it scores
                     against the single best reference, unlike mteval.)
meteor     0-100     pycocoevalcap METEOR 1.5 (Java), on PTB-tokenised text.
rouge_l    0-100     pycocoevalcap ``Rouge`` (LCS F-measure with beta=1.2, max precision
                     and max recall over references, averaged over segments) on
                     PTB-tokenised text.  Without Java, see the fallback below.
cider      raw       pycocoevalcap ``Cider`` (CIDEr, not CIDEr-D) on PTB-tokenised text;
                     IDF over the corpus references, so a one-segment corpus scores 0.
                     Typically ~2 on E2E.
ter        0-100+    sacreBLEU ``TER`` (DART's table reports it; lower is better):
                     :mod:`privtune.metrics.ter`.
=========  ========  ===================================================================

PTB tokenisation is exactly the COCO one: the Stanford PTBTokenizer jar shipped with
pycocoevalcap, run with ``-preserveLines -lowerCase`` and followed by removal of the
COCO punctuation tokens.  It is run once for all hypotheses and references (one JVM),
from a private temporary directory instead of pycocoevalcap's package directory.
METEOR is run once per call, in one batch, and its JVM is always shut down.

Java
----
METEOR and the PTB tokenizer (hence also ROUGE-L and CIDEr as the official script
computes them) need a ``java`` executable.  If none is on ``PATH``:

* ``meteor`` or ``cider`` requested -> :class:`MissingJavaError`;
* otherwise ``rouge_l`` falls back to the ``rouge-score`` package
  (``RougeScorer(['rougeL'])`` F-measure, beta=1, its own lower-casing alphanumeric
  tokenisation, max over references, averaged, x100) with a :class:`UserWarning`:
  the values are close to but not identical with the official script's;
* ``bleu`` and ``nist`` never need Java.

Empty hypotheses
----------------
A model may generate ``""``.  All metrics accept it (it scores 0 for that segment and
counts as length 0 in the corpus statistics, as in the official script).  Blank
strings are not sent to the PTB tokenizer (their tokenisation is ``""``), and METEOR
accepts an empty hypothesis as is, so no placeholder text is ever substituted: a
placeholder token would change corpus-level METEOR, whose aggregate statistics include
hypothesis lengths.  Empty *references* are rejected (``ValueError``).
"""
from __future__ import annotations

import shutil
import warnings
from typing import Iterable

from privtune.metrics.bleu import bleu
from privtune.metrics.cider import cider
from privtune.metrics.meteor import meteor
from privtune.metrics.nist import nist
from privtune.metrics.ptb import ptb_tokenize
from privtune.metrics.rouge import rouge_l, rouge_l_fallback
from privtune.metrics.ter import ter

GENERATION_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider", "ter")
_JAVA_ONLY = ("meteor", "cider")  # no Java-free equivalent is provided


class MissingJavaError(RuntimeError):
    """Raised when a Java-backed scorer is requested but no ``java`` is on PATH."""


def _java_install_message(requested: Iterable[str]) -> str:
    return (
        f"Java is required for the requested metric(s) {sorted(requested)}: "
        "pycocoevalcap METEOR runs meteor-1.5.jar and the COCO/E2E PTB tokenizer runs "
        "stanford-corenlp-3.4.1.jar, but no 'java' executable was found on PATH. "
        "Install a Java runtime (>= 8), e.g. 'apt-get install default-jre' on "
        "Debian/Ubuntu or 'conda install -c conda-forge openjdk', and make sure 'java' "
        "is on PATH. Without Java you can still compute bleu, nist and rouge_l "
        "(rouge_l then falls back to the rouge-score package, which is close to but not "
        "identical with the official E2E value), e.g. "
        "generation_metrics(hyps, refs, metrics=('bleu', 'nist', 'rouge_l'))."
    )


def _check_inputs(hypotheses, references) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a list of strings, not a single string")
    hyps = list(hypotheses)
    refs = [list(r) if not isinstance(r, str) else [r] for r in references]
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    if not hyps:
        raise ValueError("empty corpus")
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise TypeError(f"hypothesis {i} is {type(h).__name__}, not str")
    for i, rs in enumerate(refs):
        if not rs:
            raise ValueError(f"hypothesis {i} has no reference")
        for r in rs:
            if not isinstance(r, str):
                raise TypeError(f"a reference of hypothesis {i} is {type(r).__name__}, not str")
            if not r.strip():
                raise ValueError(f"hypothesis {i} has an empty reference")
    return hyps, refs


def generation_metrics(
    hypotheses: list[str],
    references: list[list[str]],
    metrics=("bleu", "nist", "meteor", "rouge_l", "cider"),
) -> dict[str, float]:
    """Corpus-level generation metrics, as the official E2E script computes them.

    ``references[i]`` is the (non-empty) list of references of ``hypotheses[i]``; lists
    may differ in length.  Returns ``{metric: float}`` for the requested ``metrics`` (a
    subset of ``bleu, nist, meteor, rouge_l, cider, ter``), with bleu, meteor, rouge_l and ter
    on a 0-100 scale and nist, cider raw (module docstring has the details).

    Raises :class:`MissingJavaError` if ``meteor`` or ``cider`` is requested and no
    ``java`` is on PATH; ``rouge_l`` then falls back to ``rouge-score`` with a warning.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    wanted = list(dict.fromkeys(m.strip().lower() for m in metrics))
    unknown = [m for m in wanted if m not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(GENERATION_METRICS)}")
    hyps, refs = _check_inputs(hypotheses, references)

    coco = [m for m in wanted if m in ("meteor", "rouge_l", "cider")]
    java = shutil.which("java") if coco else None
    if coco and java is None:
        java_only = [m for m in coco if m in _JAVA_ONLY]
        if java_only:
            raise MissingJavaError(_java_install_message(java_only))
        warnings.warn(
            "no 'java' on PATH: rouge_l is computed with the rouge-score package "
            "(beta=1, its own tokenisation) instead of pycocoevalcap's Rouge on "
            "PTB-tokenised text as in the official E2E script; values are not identical. "
            "Install Java ('apt-get install default-jre' or "
            "'conda install -c conda-forge openjdk') for the official computation.",
            UserWarning, stacklevel=2)

    out: dict[str, float] = {}
    if "bleu" in wanted:
        out["bleu"] = bleu(hyps, refs)
    if "nist" in wanted:
        out["nist"] = nist(hyps, refs)
    if "ter" in wanted:
        out["ter"] = ter(hyps, refs)

    if coco and java is None:
        out["rouge_l"] = rouge_l_fallback(hyps, refs)
    elif coco:
        flat_refs = [r for rs in refs for r in rs]
        tok = ptb_tokenize(java, hyps + flat_refs)
        tok_hyps, tok_flat = tok[: len(hyps)], tok[len(hyps):]
        gts, res, k = {}, {}, 0
        for i, rs in enumerate(refs):
            gts[i] = tok_flat[k : k + len(rs)]
            res[i] = [tok_hyps[i]]
            k += len(rs)
        if "rouge_l" in wanted:
            out["rouge_l"] = rouge_l(gts, res)
        if "cider" in wanted:
            out["cider"] = cider(gts, res)
        if "meteor" in wanted:
            out["meteor"] = 100.0 * meteor(gts, res)

    return {m: out[m] for m in wanted}
