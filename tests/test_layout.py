"""One module per concept."""
import importlib
from pathlib import Path

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


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """{module: the privtune modules it imports} (``top_level_only``: at import time; else anywhere,
    function-level imports included)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src"
    mods = {}
    for p in (src / "privtune").rglob("*.py"):
        parts = list(p.relative_to(src).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        found = set()
        for node in (tree.body if top_level_only else ast.walk(tree)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("privtune"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("privtune"))
        graph[name] = {m for m in found if m in mods and m != name and not name.startswith(m + ".")}
    return graph


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at-import", "anywhere"])
def test_imports_are_acyclic(top_level_only):
    graph, state, cycles = _import_graph(top_level_only), {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:3]


DP_CORE = ("engine", "layers", "contributions", "padding", "sampling", "noise", "accounting", "rng")


def test_the_dp_core_depends_on_nothing_above_it():
    """The engine, its layers, contributions and padding, the sampler, the noise step, the accountant and the random
    streams import no other part of the package (not the training loop, objectives, models or reports)."""
    graph = _import_graph(top_level_only=False)
    core = {f"privtune.dp.{m}" for m in DP_CORE}
    assert core <= set(graph)
    outside = {m: sorted(d for d in graph[m] if d not in core | {"privtune", "privtune.dp", "privtune.io"})
               for m in core}
    assert not any(outside.values()), outside
