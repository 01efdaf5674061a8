"""GLUE classification metrics, from the task registry (:mod:`privtune.tasks`).
:func:`classification_metrics` returns, per GLUE task (scikit-learn / scipy, values are
plain python floats, *not* multiplied by 100):

========================  ==========================================================
sst2, qnli, rte, mnli     ``accuracy``
qqp, mrpc                 ``accuracy``, ``f1`` (F1 of the positive class 1)
cola                      ``mcc`` (Matthews correlation), ``accuracy``
stsb                      ``pearson``, ``spearman`` (``preds``/``labels`` are floats)
========================  ==========================================================
"""
from __future__ import annotations

from privtune.tasks import task as _task


def classification_metrics(task: str, preds, labels) -> dict[str, float]:
    """GLUE metrics for ``task`` (its registry entry's ``metrics``), as python floats, not x100.

    ``preds`` and ``labels`` are 1-D array-likes of class ids (``stsb``: floats).
    Accuracy and F1 lie in [0, 1]; MCC, Pearson and Spearman in [-1, 1] (Pearson and
    Spearman are NaN when one of the vectors is constant).
    """
    import numpy as np

    spec = _task(task)
    if spec.kind == "table2text":
        raise ValueError(f"{spec.name} is a {spec.kind} task; its metrics come from generation_metrics")
    p = np.asarray(preds).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.shape[0]} != {y.shape[0]}")
    if p.size == 0:
        raise ValueError("no predictions")
    return {name: float(METRICS[name](p, y)) for name in spec.metrics}


def _accuracy(p, y):
    from sklearn.metrics import accuracy_score

    return accuracy_score(y, p)


def _f1(p, y):
    from sklearn.metrics import f1_score

    return f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)


def _mcc(p, y):
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(y, p)


def _pearson(p, y):
    from scipy.stats import pearsonr

    return pearsonr(p.astype("float64"), y.astype("float64"))[0]


def _spearman(p, y):
    from scipy.stats import spearmanr

    return spearmanr(p.astype("float64"), y.astype("float64"))[0]


METRICS = {"accuracy": _accuracy, "f1": _f1, "mcc": _mcc, "pearson": _pearson, "spearman": _spearman}
