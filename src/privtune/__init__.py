"""privtune: differentially private (ghost clipping) and Child-Tuning fine-tuning of language models.

One package per concept:

================  ==========================================================================
``dp``            the engine (``engine``, ``layers``: the ghost norm of each layer type,
                  ``contributions``), ``sampling`` (Poisson), ``noise`` (the Gaussian step),
                  ``accounting``, ``plan`` (what a run's settings cost in ε), ``guarantee``,
                  ``fisher_release`` (the DP Fisher), ``audit``
``childtuning``   ``mask`` (CT_F's Bernoulli mask, CT_D's fixed mask), ``fisher`` (CT_D's mask)
``objectives``    ``head``, ``mlm``, ``causal``, ``similarity`` (and their ``templates``)
``models``        ``prepare`` (fetch, build, convert), ``load``, ``methods`` (LoRA, prefix,
                  top2, retrain), ``architectures``
``training``      ``settings``, ``loop``, ``optim``, ``checkpoint``, ``distributed``, ``gpus``
``metrics``       ``classification`` and one module per generation metric
``data``          ``download``, ``readers``, ``prep``
``report``        ``tables``, ``figures``, ``claims``, ``provenance``
``bench``         ``clipping`` (engine against non-private and Opacus), ``batches``
================  ==========================================================================

``tasks`` is the one registry of task facts; ``pipeline`` is the workflow's (torch-free) glue;
``evaluate`` is the evaluation stage. The modules' former flat names (``privtune.train``,
``privtune.dp.optimizer``, ...) still import, as aliases of the new ones.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

# former module name -> its home now. `from privtune.train import run` keeps working.
MOVED = {
    "privtune.train": "privtune.training.loop",
    "privtune.checkpoint": "privtune.training.checkpoint",
    "privtune.distributed": "privtune.training.distributed",
    "privtune.gpus": "privtune.training.gpus",
    "privtune.child": "privtune.childtuning.mask",
    "privtune.fisher": "privtune.childtuning.fisher",
    "privtune.prompting": "privtune.objectives.mlm",
    "privtune.methods": "privtune.models.methods",
    "privtune.architectures": "privtune.models.architectures",
    "privtune.prep": "privtune.data.prep",
    "privtune.bench_batches": "privtune.bench.batches",
    "privtune.dp.optimizer": "privtune.dp.noise",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a former module name as a view of the module that now holds its code."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        target = importlib.import_module(MOVED[spec.name])
        alias = types.ModuleType(spec.name, f"Alias of {target.__name__}.")
        alias.__getattr__ = lambda attr: getattr(target, attr)
        alias.__dir__ = lambda: dir(target)
        return alias

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.append(_Alias())
