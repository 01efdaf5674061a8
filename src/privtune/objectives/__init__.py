"""Training objectives, selectable per experiment (``objective:``), behind one interface.

========  ==================================================================================
head      the standard heads: a new classification head (cross-entropy), a regression head
          (MSE, STS-B), or the causal LM's own head on ``table <sep> text`` (E2E, DART)
prompt    Li et al.'s pre-training-aligned formulation for classification, in the form that
          fits the model family (``prompt.family`` overrides the choice read from the model
          folder's ``config.json``):

          * ``mlm`` (BERT, RoBERTa with their masked-LM head): an LM-BFF template with a mask
            token, label words scored at the mask (:mod:`privtune.objectives.mlm`);
          * ``causal`` (GPT-2, Llama, SmolLM2): a template ending just before the label word,
            label words scored as the next token (:mod:`privtune.objectives.causal`);
          * ``similarity`` (a sentence encoder with no LM head, all-MiniLM): cosine similarity
            of the input's mean-pooled embedding to each label's description, over a
            temperature (:mod:`privtune.objectives.similarity`).
========  ==================================================================================

Training and evaluation call only :func:`objective` and the returned object's methods, so
both use the same encoding, batching, loss and prediction. Each family (``head`` and the three
prompt forms) is one :class:`~privtune.objectives.family.Family` subclass in its own module,
named by one line of :data:`~privtune.objectives.family.REGISTRY`.
"""
from __future__ import annotations

from privtune.objectives.family import FAMILIES, OBJECTIVES, REGISTRY  # torch-free: the workflow checks configs with them

_CORE = ("Objective", "objective", "prompt_family")


def __getattr__(name: str):
    """The objectives themselves (and torch) are imported on first use, so that importing the
    templates to check a config does not import torch."""
    if name in _CORE:
        from privtune.objectives import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
