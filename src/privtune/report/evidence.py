"""Uncertainty of a comparison between runs: a paired, two-level bootstrap.

A claim compares groups of runs (say DP at ε = 8 against non-private, each over its seeds) on one
evaluation set. Two things make the observed difference uncertain: which evaluation examples were
drawn (SST-2's dev set has 872: the binomial standard error of an accuracy near 75 % is about 1.5
points) and the training randomness (the seed). Each bootstrap replicate therefore

1. draws the evaluation examples with replacement, **the same draw for every run** (paired: both
   groups are scored on the same examples, so what the examples share cancels), and
2. draws, within each group of several seeds, the seeds with replacement,

then scores every drawn run on the drawn examples, averages each group over its drawn seeds and
takes the difference. The interval is the 2.5th and 97.5th percentile of those differences
(:data:`LEVEL`). With one seed per group step 2 draws nothing: the interval then covers the
evaluation sample only, and :class:`Comparison` says so (``seeds``).

Scores are in the tables' scales (accuracy, F1 and MCC in percent, BLEU 0-100). Per-example
predictions come from the evaluation stage (``predictions.json`` beside each run's ``metrics.json``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privtune.io import read_json
from privtune.report.tables import PERCENT  # the metrics the tables show x100
from privtune.tasks import TASKS

REPLICATES = 2000  # bootstrap replicates for metrics computed in closed form (accuracy, F1, MCC, Pearson)
SLOW_REPLICATES = 200  # for corpus-level generation metrics (each replicate rescores the corpus)
LEVEL = 0.95
RUN_KEY = ("paper", "task", "model", "method", "variant", "eps", "seed")  # a run's identity, as in the tables
SEED = 0  # the bootstrap's own generator: the report is reproducible


@dataclass(frozen=True)
class RunPredictions:
    """One run's per-example output on the evaluation set."""

    task: str
    predictions: list  # class ids, scores (STS-B) or generated texts
    labels: list  # class ids, scores, or lists of reference texts

    @property
    def n(self) -> int:
        return len(self.predictions)


def read_predictions(path: str | Path) -> RunPredictions:
    d = read_json(path)
    return RunPredictions(d["task"], d["predictions"], d["labels"])


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT else 1.0


def _binary_counts(p: np.ndarray, y: np.ndarray, idx: np.ndarray):
    tp = ((p == 1) & (y == 1))[idx].sum(1).astype(float)
    tn = ((p == 0) & (y == 0))[idx].sum(1).astype(float)
    fp = ((p == 1) & (y == 0))[idx].sum(1).astype(float)
    fn = ((p == 0) & (y == 1))[idx].sum(1).astype(float)
    return tp, tn, fp, fn


def _vectorised(metric: str, p: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
    """The metric on every row of example indices ``idx`` (R, n) at once; None where no closed form here."""
    if metric in ("accuracy", "accuracy_mm"):
        return (p == y).astype(float)[idx].mean(1)
    binary = set(np.unique(y)) <= {0, 1} and set(np.unique(p)) <= {0, 1}
    if metric == "f1" and binary:
        tp, _, fp, fn = _binary_counts(p, y, idx)
        den = 2 * tp + fp + fn
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    if metric == "mcc" and binary:  # sklearn's convention: 0 where a marginal is empty
        tp, tn, fp, fn = _binary_counts(p, y, idx)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1), 0.0)
    if metric == "pearson":
        x, z = p.astype(float)[idx], y.astype(float)[idx]
        x, z = x - x.mean(1, keepdims=True), z - z.mean(1, keepdims=True)
        den = np.sqrt((x * x).sum(1) * (z * z).sum(1))
        return np.where(den > 0, (x * z).sum(1) / np.where(den > 0, den, 1), 0.0)  # a constant predictor: 0
    return None


def score(run: RunPredictions, metric: str, idx: np.ndarray) -> np.ndarray:
    """``metric`` of ``run`` on each row of ``idx`` (R, n), in the tables' scale."""
    kind = TASKS[run.task].kind
    if kind != "table2text":
        p, y = np.asarray(run.predictions), np.asarray(run.labels)
        fast = _vectorised(metric, p, y, idx)
        if fast is not None:
            return fast * _scale(metric)
        from privtune.metrics import classification_metrics

        return np.array([classification_metrics(run.task, p[i], y[i])[metric] for i in idx]) * _scale(metric)
    from privtune.metrics import generation_metrics

    return np.array([generation_metrics([run.predictions[j] for j in i], [run.labels[j] for j in i],
                                        metrics=(metric,))[metric] for i in idx])


def _replicates(task: str, given: int | None) -> int:
    """``given``, else fewer replicates for generation metrics (each replicate rescores the corpus)."""
    return given or (SLOW_REPLICATES if TASKS[task].kind == "table2text" else REPLICATES)


def _bounds(values: np.ndarray) -> tuple[float, float]:
    """The :data:`LEVEL` percentile interval of bootstrap values."""
    alpha = (1 - LEVEL) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def interval(run: RunPredictions, metric: str, replicates: int | None = None, seed: int = SEED
             ) -> tuple[float, float]:
    """The :data:`LEVEL` bootstrap interval of one run's ``metric`` over its evaluation examples."""
    reps = _replicates(run.task, replicates)
    return _bounds(score(run, metric, np.random.default_rng(seed).integers(0, run.n, size=(reps, run.n))))


def constant_predictions(run: RunPredictions) -> RunPredictions:
    """The no-learning reference of a task without a zero-shot model (a new head starts at random): the
    constant prediction a model that learned nothing converges to, the majority class, or the mean
    score of a regression (whose correlation is 0)."""
    y = np.asarray(run.labels)
    if TASKS[run.task].kind == "regression":
        const = float(y.mean())
    else:
        values, counts = np.unique(y, return_counts=True)
        const = values[counts.argmax()].item()
    return RunPredictions(run.task, [const] * len(y), list(run.labels))


@dataclass
class Comparison:
    """``a − b`` (group means over seeds) with its bootstrap interval."""

    diff: float
    low: float
    high: float
    a: float
    b: float
    seeds: tuple[int, int]
    spread_a: tuple[float, float] = (math.nan, math.nan)  # min and max over a's seeds
    spread_b: tuple[float, float] = (math.nan, math.nan)
    replicates: int = 0
    examples: int = 0
    notes: list[str] = field(default_factory=list)
    points_a: tuple[float, ...] = ()  # each of a's runs on all the examples, in the order given
    points_b: tuple[float, ...] = ()

    def above(self, threshold: float) -> bool:
        """The whole interval lies above ``threshold``."""
        return self.low > threshold

    def below(self, threshold: float) -> bool:
        return self.high < threshold

    def text(self) -> str:
        seeds = ("1 seed each: the interval covers the evaluation sample, not the training randomness"
                 if max(self.seeds) == 1 else f"seeds {self.seeds[0]} vs {self.seeds[1]}")
        return (f"difference {self.diff:+.2f}, {int(LEVEL * 100)} % interval [{self.low:+.2f}, {self.high:+.2f}] "
                f"({seeds}; {self.examples} examples, {self.replicates} paired bootstrap replicates)")


def _spread(values: np.ndarray) -> tuple[float, float]:
    return (float(values.min()), float(values.max())) if len(values) else (math.nan, math.nan)


def compare(a: list[RunPredictions], b: list[RunPredictions], metric: str, replicates: int | None = None,
            seed: int = SEED, paired_seeds: bool = False) -> Comparison:
    """Group ``a`` (one entry per seed) against group ``b`` on the same evaluation set.

    ``paired_seeds``: ``a[i]`` and ``b[i]`` share their training randomness (the same seed's data order,
    sampling and noise under two settings, say two precisions), so each replicate draws the seeds once,
    for both groups, and what a seed does to both cancels as the examples' shared difficulty does."""
    if not a or not b:
        raise ValueError("compare needs at least one run in each group")
    if paired_seeds and len(a) != len(b):
        raise ValueError(f"paired seeds need as many runs in each group: {len(a)} against {len(b)}")
    n = a[0].n
    if any(r.n != n for r in [*a, *b]):
        raise ValueError(f"the runs compared were evaluated on different numbers of examples: "
                         f"{sorted({r.n for r in [*a, *b]})}")
    reps = _replicates(a[0].task, replicates)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n))
    full = np.arange(n)[None, :]

    shared = rng.integers(0, len(a), size=(reps, len(a))) if paired_seeds and len(a) > 1 else None

    def group(runs):
        per_run = np.stack([score(r, metric, idx) for r in runs])  # (seeds, R)
        point = np.array([score(r, metric, full)[0] for r in runs])
        if len(runs) > 1:  # seeds with replacement: per replicate, independently per group unless paired
            pick = shared if shared is not None else rng.integers(0, len(runs), size=(reps, len(runs)))
            boot = np.take_along_axis(per_run.T, pick, axis=1).mean(1)
        else:
            boot = per_run[0]
        return point, boot

    pa, ba = group(a)
    pb, bb = group(b)
    low, high = _bounds(ba - bb)
    return Comparison(float(pa.mean() - pb.mean()), low, high, float(pa.mean()), float(pb.mean()),
                      (len(a), len(b)), _spread(pa), _spread(pb), reps, n,
                      points_a=tuple(map(float, pa)), points_b=tuple(map(float, pb)))
