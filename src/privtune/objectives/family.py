"""What an objective family is, and the one registry of them.

A family is one way of turning a task's examples into per-example losses and predictions: the
standard heads, or one form of Li et al.'s pre-training-aligned prompt objective. Each family is
a subclass of :class:`Family` in a module of its own, and one line of :data:`REGISTRY` names it.
The registry is plain data, so a config is checked here without importing torch; the class is
imported on first use.

Adding a family: write its module (a :class:`Family` subclass: ``load``, ``encode``, ``collate``,
``loss`` and ``logits``; ``predict``, ``prepare``, ``save`` and ``step_record`` where the defaults
do not fit), add one :class:`Registered` line below, and name it in an experiment's
``prompt.family``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from privtune.objectives import templates
from privtune.objectives.templates import PromptObjectiveError
from privtune.tasks import canonical

OBJECTIVES = ("head", "prompt")  # an experiment's ``objective:``


@dataclass(frozen=True)
class Registered:
    impl: str  # "module:Class", imported on first use
    needs: str  # what the family needs from the model and the task (for errors and the README)
    check: Callable[[str, dict], object] | None = None  # torch-free: refuses a task / prompt the family cannot take


REGISTRY: dict[str, Registered] = {
    "head": Registered("privtune.objectives.head:Head",
                       "a new classification or regression head, or a causal LM's own head (table-to-text)"),
    "mlm": Registered("privtune.objectives.mlm:MaskedLM",
                      "a masked LM with its pretrained MLM head; an LM-BFF template and one label word per label",
                      templates.mlm_spec),
    "causal": Registered("privtune.objectives.causal:NextToken",
                         "a causal LM; a template ending before the label word, one single-token word per label",
                         templates.spec_for),
    "similarity": Registered("privtune.objectives.similarity:Similarity",
                             "a sentence encoder; one description per label, single-sentence inputs",
                             templates.descriptions_for),
}
FAMILIES = tuple(name for name in REGISTRY if name != "head")  # the prompt objective's forms (``prompt.family``)


def key(name: str, family: str | None) -> str:
    """The registry key of objective ``name`` (``head`` | ``prompt``) in ``family``."""
    return "head" if name == "head" else family


def family_class(name: str) -> type:
    """The :class:`Family` subclass registered as ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"no objective family {name!r}; registered: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].impl.split(":")
    return getattr(importlib.import_module(module), cls)


def check(kind: str, task: str | None, name: str, num_labels: int, prompt: dict, family: str | None = None) -> None:
    """Refuse an objective the task cannot use, before any work (family None: the model is not known yet,
    so any family's template will do)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
    if name != "prompt":
        return
    if kind != "classification":
        raise PromptObjectiveError(f"objective: prompt scores label words, so it needs a classification task; task "
                                   f"{task!r} is {kind}. Use objective: head.")
    words = prompt.get("label_words")
    if words is not None and len(words) != num_labels:
        raise ValueError(f"prompt.label_words {words} has {len(words)} words; task {task} has {num_labels} labels")
    forms = [f for f in REGISTRY if f != "head"]
    if family is not None and family not in forms:
        known = "; ".join(f"{f}: {REGISTRY[f].needs}" for f in forms)
        raise ValueError(f"prompt.family must be a registered prompt family {forms} "
                         f"(privtune.objectives.family.REGISTRY), got {family!r}. Registered: {known}")
    if prompt.get("anchors", "fixed") not in ("fixed", "live"):
        raise ValueError(f"prompt.anchors must be fixed or live, got {prompt['anchors']!r}")
    if family is not None:
        if REGISTRY[family].check is not None:
            REGISTRY[family].check(task, prompt)
    elif not (templates.supports_prompt(task) or canonical(task, strict=False) in templates.CAUSAL_TEMPLATES
              or "template" in prompt):
        templates.mlm_spec(task, prompt)  # no family's template fits: its error names the task


class Family:
    """The interface of one objective family. ``obj`` is the :class:`~privtune.objectives.Objective`
    (``kind``, ``task``, ``num_labels``, ``prompt``) the family serves."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def load(self, model_dir: Path):
        """The model the family trains, from a prepared model folder."""
        raise NotImplementedError

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list:
        """Training or evaluation examples of ``records``."""
        raise NotImplementedError

    def collate(self, examples: list, pad_id: int, device) -> dict:
        """One batch of encoded examples, on ``device``."""
        raise NotImplementedError

    def loss(self, model, batch: dict):
        """Per-example losses, shape (B,): what DP clips."""
        raise NotImplementedError

    def logits(self, model, batch: dict):
        """Class scores (B, K) that :meth:`predict` takes the argmax of."""
        raise NotImplementedError

    def predict(self, model, encoded: list, pad_id: int, device, batch_size: int = 64) -> list:
        """Predictions in the order of ``encoded``; batches are formed by length (less padding)."""
        import torch

        model.eval()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        preds: list = [None] * len(encoded)
        with torch.no_grad():
            for lo in range(0, len(order), batch_size):
                idx = order[lo: lo + batch_size]
                batch = self.collate([encoded[i] for i in idx], pad_id, device)
                for i, p in zip(idx, self.logits(model, batch).argmax(-1).tolist()):
                    preds[i] = p
        return preds

    def prepare(self, model, tokenizer, device, model_dir: Path | None = None) -> None:
        """Before the first step or prediction (``model_dir``: a trained run's folder to read back from)."""

    def save(self, model, folder: Path) -> None:
        """What the family keeps beside the weights."""

    def step_record(self, model, tokenizer, device) -> dict:
        """Per-step quantities that are functions of the parameters alone (no data: free to log under DP)."""
        return {}
