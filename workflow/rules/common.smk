# Expand config.yaml's experiments into runs, and helpers the rules share.

from privtune.pipeline import Run, canonical, data_spec, expand_runs, fisher_data, fisher_settings, run_settings
from privtune.report.figures import PAPER_FIGURES

RUNS = expand_runs(config)
PAPERS = sorted({r.paper for r in RUNS})


wildcard_constraints:
    eps=r"inf|[0-9]+(\.[0-9]+)?",
    seed=r"\d+",
    part=r"train|eval|public~[a-z_]+",
    source=r"train|dp-eps[0-9.e+-]+|public-[a-z0-9]+-[a-z_]+",
    pd=r"[0-9.]+",
    paper=r"li2022|xu2021",
    figure=r"[a-z_]+",
    device=r"cpu|cuda",


def run_for(wildcards):
    return Run.from_wildcards(config, wildcards)


def metrics_files(paper):
    return [r.path("metrics.json") for r in RUNS if r.paper == paper]


def report_targets():
    out = ["results/privacy_audit.json"]
    for paper in PAPERS:
        out += [f"results/tables/{paper}.md", f"results/tables/{paper}.csv"]
        out += [f"results/figures/{paper}_{fig}.png" for fig in PAPER_FIGURES[paper]]
    return out
