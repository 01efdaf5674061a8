"""One module per concept, and the former flat module names still import (as views of the new ones)."""
import importlib

import pytest

import privtune

CONCEPTS = {  # paper concept -> the module named for it
    "ghost norm per layer type (a registry)": "privtune.dp.layers",
    "accountant": "privtune.dp.accounting",
    "Poisson sampler": "privtune.dp.sampling",
    "noise step": "privtune.dp.noise",
    "privacy plan of a run": "privtune.dp.plan",
    "DP Fisher release": "privtune.dp.fisher_release",
    "Fisher information and the top-p_D mask": "privtune.childtuning.fisher",
    "child masks": "privtune.childtuning.mask",
    "head objective": "privtune.objectives.head",
    "masked-LM prompt objective": "privtune.objectives.mlm",
    "causal-LM prompt objective": "privtune.objectives.causal",
    "similarity objective": "privtune.objectives.similarity",
    "BLEU": "privtune.metrics.bleu",
    "NIST": "privtune.metrics.nist",
    "METEOR": "privtune.metrics.meteor",
    "ROUGE-L": "privtune.metrics.rouge",
    "CIDEr": "privtune.metrics.cider",
    "classification metrics": "privtune.metrics.classification",
    "task registry": "privtune.tasks",
}


@pytest.mark.parametrize("module", sorted(set(CONCEPTS.values())))
def test_each_concept_has_its_module(module):
    assert importlib.import_module(module).__doc__


@pytest.mark.parametrize("old", sorted(privtune.MOVED))
def test_former_module_names_still_import(old):
    alias, new = importlib.import_module(old), importlib.import_module(privtune.MOVED[old])
    public = [n for n in dir(new) if not n.startswith("_") and not isinstance(getattr(new, n), type(importlib))]
    assert public and all(getattr(alias, n) is getattr(new, n) for n in public)


def test_a_name_the_former_module_never_had_is_still_an_error():
    from privtune import train  # noqa: F401  (privtune.train: the training loop's former name)

    with pytest.raises(AttributeError):
        privtune.train.no_such_name  # noqa: B018
    from privtune.train import RunSettings, run  # noqa: F401
