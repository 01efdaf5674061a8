"""One module per concept."""
import importlib

import pytest

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
