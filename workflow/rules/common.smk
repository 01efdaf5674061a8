# Expand config.yaml's experiments into runs, and helpers the rules share.

from privtune.pipeline import Run, canonical, data_spec, expand_runs, fisher_data, fisher_settings, run_settings
from privtune.pipeline import extra_eval_files, paper_figures, user_files
from privtune.report.provenance import provenance_text as _provenance_text

RUNS = expand_runs(config)
PAPERS = sorted({r.paper for r in RUNS})


wildcard_constraints:
    eps=r"inf|[0-9]+(\.[0-9]+)?",
    seed=r"\d+",
    method=r"[a-z_0-9]+(/[a-zA-Z]+~[a-z0-9.e+-]+(_[a-zA-Z]+~[a-z0-9.e+-]+)*)?",
    part=r"train|eval|eval_mm|public~[a-z_]+",
    source=r"train|dp-eps[0-9.e+-]+|public-[a-z0-9]+-[a-z_]+",
    pd=r"[0-9.]+",
    paper=r"li2022|xu2021",
    figure=r"[a-z_]+",
    device=r"cpu|cuda",


def run_for(wildcards):
    return Run.from_wildcards(config, wildcards)


def partition(gpus):
    """The SLURM partition of a job asking for ``gpus`` GPUs (config slurm_partitions; profiles/slurm)."""
    return config["slurm_partitions"]["gpu" if gpus else "cpu"]


def train_gpus(wildcards):
    """GPUs a training job asks for: config `gpu` per data-parallel process (train.world_size)."""
    return config["gpu"] * run_settings(config, run_for(wildcards)).get("world_size", 1)


def metrics_files(paper):
    return [r.path("metrics.json") for r in RUNS if r.paper == paper]


def figure_inputs(paper, figure):
    if figure == "epsilon_vs_steps":
        return [r.path("privacy.json") for r in RUNS if r.paper == paper and r.private]
    return [f"results/tables/{paper}.csv"]


def provenance_text(paper):
    return _provenance_text(config, paper)


def benchmark_args(device):
    """The clipping benchmark's command-line options from config `benchmark` (validated: every key set)."""
    b = config["benchmark"]
    args = ["--device", device, "--seq", str(b["seq"]), "--steps", str(b["steps"]), "--precision", *b["precision"]]
    if b["batch"]:
        args += ["--batch", str(b["batch"])]
    if b["interleave"]:
        args += ["--interleave", str(b["interleave"])]
    if b["methods"]:
        args += ["--methods", *b["methods"]]
    if b["shapes"]:
        args += ["--shapes-json", json.dumps(b["shapes"])]
    return args


def claims_inputs(wildcards):
    inputs = {"tables": [f"results/tables/{paper}.csv" for paper in PAPERS],
              "predictions": [r.path("predictions.json") for r in RUNS]}
    if config["benchmark"]["in_report"]:
        inputs["benchmark"] = "results/benchmarks/clipping_cpu.json"
    return inputs


def report_targets():
    out = ["results/privacy_audit.json", "results/provenance/config.yaml", "results/provenance/software.tsv",
           "results/claims.md"]
    for paper in PAPERS:
        out += [f"results/tables/{paper}.{ext}" for ext in ("md", "csv", "tex")]
        out += [f"results/figures/{paper}_{fig}.png" for fig in paper_figures(RUNS, paper)]
    if config["benchmark"]["in_report"]:
        out.append("results/benchmarks/clipping_cpu.png")
    return out
