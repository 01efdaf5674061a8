"""Evaluation metrics: GLUE classification metrics (:mod:`.classification`) and the E2E-style
generation metrics (:mod:`.generation`; one module per metric: :mod:`.bleu`, :mod:`.nist`,
:mod:`.meteor`, :mod:`.rouge`, :mod:`.cider`, on the :mod:`.ptb` tokenisation)."""
from privtune.metrics.classification import classification_metrics
from privtune.metrics.generation import GENERATION_METRICS, MissingJavaError, generation_metrics

__all__ = ["MissingJavaError", "classification_metrics", "generation_metrics", "GENERATION_METRICS"]
