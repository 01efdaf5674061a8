"""The names a config chooses among, and the checks on them that need no model.

Torch-free, so that building the workflow's DAG (``privtune.pipeline``) imports no deep-learning
stack; :mod:`privtune.models.methods` and :mod:`privtune.childtuning.mask` re-export these names.
"""
from __future__ import annotations

METHODS = ("full", "lora", "prefix", "top2", "retrain")  # fine-tuning methods (privtune.models.methods)
CHILD_METHODS = ("vanilla", "ct_f", "ct_d")  # Child-Tuning (privtune.childtuning.mask)


class MethodError(ValueError):
    """A fine-tuning method that cannot be applied as configured."""


def check_objective(method: str, objective: str) -> None:
    """LoRA and prefix-tuning wrap the model in peft; the prompt objective calls the masked-LM head on the
    mask position itself, outside that wrapper, so the two are not combined (a :class:`MethodError`)."""
    if objective == "prompt" and method in ("lora", "prefix"):
        raise MethodError(f"method {method!r} is not supported with objective: prompt (the masked-LM head is "
                          "called on the mask position only, outside peft's wrapper); use full, top2 or retrain, "
                          "or objective: head")
