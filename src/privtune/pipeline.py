"""From config.yaml's experiments to runs: result paths and per-run settings.

Kept out of the Snakefile so it can be tested; the rules only call these.
A run is one (paper, task, model, method, ε, seed); its files live under
``results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/``.

An experiment with a ``sweep`` (a grid over batch size, learning rate, clipping norm
or objective, as in Li et al.'s hyper-parameter heatmap) adds one run per grid point,
under ``results/{paper}/{task}/{model}/{method}/bs~{B}_lr~{lr}/eps~{eps}/seed~{seed}/``
(only the swept keys appear: ``C~3``, ``obj~head``): the ``{method}`` path element then
carries the grid point.

An experiment with ``zero_shot: true`` adds one run per model and seed with method
``zeroshot`` and ε = 0 (``eps~0``): the untrained model with the experiment's objective.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass

from privtune.choices import CHILD_METHODS, MethodError, check_objective
from privtune.choices import METHODS as DP_METHODS
from privtune import tasks
from privtune.tasks import task_info
from privtune.dp import guarantee
from privtune.objectives import family as objective_family


def canonical(obj):
    """``obj`` with dict keys sorted recursively.

    Snakemake reruns a job when the repr of its params changes; sorting makes
    that depend on the values only, not on the order keys were written in the config.
    """
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def eps_token(eps) -> str:
    if eps == "inf" or (isinstance(eps, float) and math.isinf(eps)):
        return "inf"
    return f"{float(eps):g}"


def pd_token(p: float) -> str:
    return f"{float(p):g}"


@dataclass(frozen=True)
class Run:
    experiment: str
    paper: str
    task: str
    model: str
    method: str
    eps: str  # "3", "8", "inf"
    seed: int
    hparams: tuple = ()  # a sweep's grid point: (("batch_size", 256), ("lr", 0.001))

    @property
    def private(self) -> bool:
        return self.eps not in ("inf", "0")

    @property
    def zero_shot(self) -> bool:
        return self.method == ZERO_SHOT

    @property
    def variant(self) -> str:
        """The grid point as a path element (``bs~256_lr~0.001``); empty for an experiment's main runs."""
        h = dict(self.hparams)
        return "_".join(f"{tag}~{h[k]:g}" if isinstance(h[k], float) else f"{tag}~{h[k]}"
                        for k, tag in SWEEP_KEYS.items() if k in h)

    @property
    def method_dir(self) -> str:
        """The ``{method}`` wildcard's value: the method, and the sweep's grid point if any."""
        return f"{self.method}/{self.variant}" if self.hparams else self.method

    @property
    def directory(self) -> str:
        return f"results/{self.paper}/{self.task}/{self.model}/{self.method_dir}/eps~{self.eps}/seed~{self.seed}"

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def exp(self, config: dict) -> dict:
        return next(e for e in config["experiments"] if e["name"] == self.experiment)

    def mask_path(self, config: dict) -> str:
        e = self.exp(config)
        child = e.get("child", {})
        return (f"results/fisher/{self.task}/{self.model}/{fisher_source_token(e)}/"
                f"pd~{pd_token(child['p_d'])}/seed~{self.seed}/mask.pt")

    @classmethod
    def from_wildcards(cls, config: dict, wc) -> "Run":
        r = _run_index(config).get((wc.paper, wc.task, wc.model, wc.method, wc.eps, int(wc.seed)))
        if r is None:
            raise ValueError(f"no experiment in the config produces run {dict(wc.items())}")
        return r

    def eval_spec(self, config: dict) -> dict:
        e = self.exp(config)
        info = task_info(self.task)
        return canonical({"kind": info["kind"], "task": self.task, "generation": e.get("generation", {}),
                "metrics": e.get("eval_metrics"),
                "meta": {"paper": self.paper, "model": self.model, "method": self.method, "eps": self.eps,
                         "objective": run_objective(self, e), "prompt": e.get("prompt", {}),
                         "seed": self.seed, "experiment": self.experiment, "num_labels": info["num_labels"],
                         "variant": self.variant, "hparams": dict(self.hparams),
                         "max_length": config["datasets"][self.task]["max_length"]}})


ZERO_SHOT = "zeroshot"
SWEEP_KEYS = {"batch_size": "bs", "lr": "lr", "clip_norm": "C", "objective": "obj"}  # path tags, in path order


def run_objective(run: Run, e: dict) -> str:
    """The objective of a run: the experiment's, unless its grid point sweeps it."""
    return dict(run.hparams).get("objective", e["objective"])


def has_dp(e: dict) -> bool:
    """Whether an experiment has a run with a finite ε."""
    return any(x != "inf" for x in e.get("epsilons", []))


def fisher_source(e: dict) -> str:
    """Where an experiment's Child-Tuning_D mask comes from: ``child.fisher_source`` when set, else the
    accounted choice: ``dp`` when the experiment has a finite ε (its ε then covers the mask), ``train``
    (the paper's, no noise) when every run is non-private."""
    given = e.get("child", {}).get("fisher_source")
    if given:
        return given
    return "dp" if has_dp(e) else "train"


def fisher_source_token(e: dict) -> str:
    """The Child-Tuning_D mask's source as a path element: ``train``, ``dp-eps1``, ``public-sst2-dev``."""
    child = e.get("child", {})
    source = fisher_source(e)
    if source == "dp":
        return f"dp-eps{float(child['fisher_epsilon']):g}"
    if source == "public":
        pub = child["public_data"]
        return f"public-{pub['task']}-{pub['split']}"
    return source


def _check_child(e: dict, config: dict) -> None:
    """Child-Tuning settings that the schema cannot check, refused before any job."""
    child, where = e.get("child", {}), f"experiment '{e['name']}': child"
    source = fisher_source(e)
    if source == "dp" and "ct_d" in e["methods"]:
        eps_f = child.get("fisher_epsilon")
        if eps_f is None:
            implied = "" if child.get("fisher_source") else " (the default when the experiment has a finite ε)"
            raise ValueError(f"{where}.fisher_source is dp{implied} but child.fisher_epsilon (the ε of the Fisher) "
                             "is not set: set child.fisher_epsilon below every ε of the experiment, or "
                             "child.fisher_source: public with child.public_data")
        too_small = [x for x in e["epsilons"] if x != "inf" and float(x) <= eps_f]
        if too_small:
            raise ValueError(f"{where}.fisher_epsilon = {eps_f} leaves no budget for training at ε = {too_small}: "
                             "choose a fisher_epsilon below every ε of the experiment")
    if source == "public":
        pub = child.get("public_data")
        if not pub:
            raise ValueError(f"{where}.fisher_source is public but child.public_data {{task, split}} is not set")
        if pub["task"] not in config["datasets"]:
            raise ValueError(f"{where}.public_data.task '{pub['task']}' has no entry under datasets: in the config")


def _check_guarantee(e: dict, config: dict) -> None:
    """A DP experiment with a setting its ε does not cover, refused before any job unless
    train.allow_unaccounted (privtune.dp.guarantee; training refuses it again)."""
    if not has_dp(e):
        return
    train = {**config.get("train_defaults", {}), **e.get("train", {})}
    guarantee.check(True, bool(train.get("allow_unaccounted")), f"experiment '{e['name']}'",
                    sampling=guarantee.sampling_scheme(train["sampling"], True), verify_engine=train["verify_engine"],
                    mask_source=fisher_source(e) if "ct_d" in e["methods"] else None)


def _check_objective(e: dict) -> None:
    """A prompt objective the experiment cannot use, refused before any job (names the experiment)."""
    info = task_info(e["task"])
    prompt = e.get("prompt") or {}
    try:
        objective_family.check(info["kind"], e["task"], e["objective"], info["num_labels"], prompt, prompt.get("family"))
        for meth in e["methods"]:
            check_objective(meth, e["objective"])
    except (ValueError, MethodError) as err:
        raise ValueError(f"experiment '{e['name']}': {err}") from err


_INDEX: dict[str, dict] = {}


def _run_index(config: dict) -> dict:
    """Runs by their path wildcards, expanded once per distinct config (the DAG asks once per job)."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _INDEX:
        _INDEX.clear()
        _INDEX[key] = {(r.paper, r.task, r.model, r.method_dir, r.eps, r.seed): r for r in expand_runs(config)}
    return _INDEX[key]


def expand_runs(config: dict) -> list[Run]:
    tasks.register_config_tasks(config)  # a user's own datasets (user_tasks:) join the task registry
    runs, seen = [], set()
    names = [e["name"] for e in config["experiments"]]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique in the config: {names}")
    for e in config["experiments"]:
        tasks.canonical(e["task"])  # a task of the registry or of user_tasks:, else an error naming both
        if e["task"] not in config["datasets"]:
            raise ValueError(f"experiment '{e['name']}': task '{e['task']}' has no entry under datasets: in the config")
        for m in e["models"]:
            if m not in config["models"]:
                raise ValueError(f"experiment '{e['name']}': model '{m}' is not defined under models: in the config "
                                 f"(defined: {sorted(config['models'])})")
        if "ct_d" in e["methods"]:
            _check_child(e, config)
        _check_guarantee(e, config)
        if e["objective"] != "head":
            _check_objective(e)
        allowed = CHILD_METHODS if e["paper"] == "xu2021" else DP_METHODS
        for meth in e["methods"]:
            if meth not in allowed:
                raise ValueError(f"experiment '{e['name']}': method '{meth}' is not one of {allowed} for {e['paper']}")
        if e.get("zero_shot") and e["objective"] == "head" and task_info(e["task"])["kind"] != "table2text":
            raise ValueError(f"experiment '{e['name']}': zero_shot needs objective: prompt (a new classification "
                             "head is random before training) or a table-to-text task")
        grid = list(itertools.product(e["models"], e["methods"], e["epsilons"], e["seeds"], sweep_points(e)))
        if e.get("zero_shot"):
            grid += [(model, ZERO_SHOT, 0, seed, ()) for model in e["models"] for seed in e["seeds"]]
        for model, meth, eps, seed, hp in grid:
            r = Run(e["name"], e["paper"], e["task"], model, meth, eps_token(eps), int(seed), hp)
            if r.directory in seen:
                raise ValueError(f"two experiments produce the same run {r.directory}; give them different "
                                 "tasks, models, methods, epsilons, seeds or sweep points")
            seen.add(r.directory)
            runs.append(r)
    return runs


def sweep_points(e: dict) -> list[tuple]:
    """An experiment's grid points: ``[()]`` without a sweep, else one ``((key, value), ...)`` per point
    of the product of the swept keys' values (keys in :data:`SWEEP_KEYS` order)."""
    sweep = e.get("sweep")
    if not sweep:
        return [()]
    cast = {"batch_size": int, "lr": float, "clip_norm": float, "objective": str}
    keys = [k for k in SWEEP_KEYS if k in sweep]
    return [tuple((k, cast[k](v)) for k, v in zip(keys, values))
            for values in itertools.product(*(sweep[k] for k in keys))]


def run_settings(config: dict, run: Run) -> dict:
    """The flat RunSettings dict for a run, the one place settings are resolved: package defaults <
    train_defaults < the experiment's train, then, for a run that is not private, < nonprivate_defaults
    (shuffled epochs, a decaying lr: no DP default reaches a baseline) < the experiment's nonprivate_train."""
    e = run.exp(config)
    info = task_info(run.task)
    s = {**config.get("train_defaults", {}), **e.get("train", {})}
    if not run.private:
        s.update(config.get("nonprivate_defaults", {}))
        s.update(e.get("nonprivate_train", {}))
    s["sampling"] = guarantee.sampling_scheme(s.get("sampling"), run.private)
    hp = dict(run.hparams)
    s.update({k: v for k, v in hp.items() if k != "objective"})
    if "batch_size" in hp and s["physical_batch_size"] > s["batch_size"]:
        s["physical_batch_size"] = s["batch_size"]
    if run_objective(run, e) != "head":
        s.update(objective=run_objective(run, e), prompt=e.get("prompt", {}))
    if run.zero_shot:
        s["zero_shot"] = True
    s.update(kind=info["kind"], num_labels=info["num_labels"], seed=run.seed, threads=config.get("threads"),
             task=run.task,
             epsilon=None if not run.private else float(run.eps),
             max_length=config["datasets"][run.task]["max_length"])
    if run.method in DP_METHODS or run.zero_shot:
        s["method"] = "full" if run.zero_shot else run.method
        given = e.get("method_options", {}).get(run.method)
        if given:
            s["method_options"] = given
    child = e.get("child", {})
    if run.method in CHILD_METHODS:
        s["child"] = run.method
        s["p_f"] = child["p_f"]
        s["child_strict"] = child["strict"]
    return canonical(s)


def fisher_experiment(config: dict, task: str, model: str, source: str) -> dict:
    """The (first) experiment whose Child-Tuning_D runs use the mask of (task, model, source)."""
    for e in config["experiments"]:
        if (e["task"] == task and model in e["models"] and "ct_d" in e["methods"]
                and fisher_source_token(e) == source):
            return e
    raise ValueError(f"no experiment uses a Fisher mask from source '{source}' for {task}/{model}")


def fisher_data(config: dict, task: str, model: str, source: str) -> str:
    """The prepared data file a mask is computed from: the training data, or the public data named."""
    e = fisher_experiment(config, task, model, source)
    child = e.get("child", {})
    if fisher_source(e) == "public":
        pub = child["public_data"]
        return f"results/data/{pub['task']}/public~{pub['split']}.jsonl"
    return f"results/data/{task}/train.jsonl"


def fisher_settings(config: dict, task: str, model: str, source: str, p_d: float, seed: int) -> dict:
    """Arguments of :func:`privtune.childtuning.fisher.compute_mask_file` for one mask."""
    e = fisher_experiment(config, task, model, source)
    child = e.get("child", {})
    data_task = child["public_data"]["task"] if fisher_source(e) == "public" else task
    info = task_info(data_task)
    train = {**config.get("train_defaults", {}), **e.get("train", {})}
    return canonical({"kind": info["kind"], "num_labels": info["num_labels"], "p_d": p_d,
                      "batch_size": child["fisher_batch_size"],
                      "max_length": config["datasets"][data_task]["max_length"], "seed": seed,
                      "threads": config.get("threads"), "source": fisher_source(e),
                      "fisher_epsilon": child.get("fisher_epsilon"), "fisher_clip": child["fisher_clip"],
                      "mode": child["fisher_mode"], "delta": train["delta"],
                      "secure_noise": bool(train["secure_rng"] or train["secure_noise"])})


def mismatched_split(ds: dict) -> str:
    """MNLI's mismatched split: ``dev_mismatched`` of full GLUE, ``test_mismatched`` of the 16-shot data."""
    return ds.get("eval_mm_split") or ("test_mismatched" if ds.get("k_shot_seed") is not None else "dev_mismatched")


def extra_eval_files(task: str) -> list[str]:
    """Evaluation files beyond ``eval.jsonl``: MNLI's mismatched set (its accuracy is ``accuracy_mm``)."""
    return [f"results/data/{task}/eval_mm.jsonl"] if tasks.task(task).mismatched else []


def user_files(config: dict, task: str) -> list[str]:
    """A user task's local files (the ``prepare_data`` rule's inputs, so that a changed file reruns it)."""
    spec = (config.get("user_tasks") or {}).get(task) or {}
    return sorted({os.path.expanduser(f) for f in (spec.get("files") or {}).values()})


def data_spec(config: dict, task: str, part: str) -> dict:
    """What the ``prepare_data`` rule reads for ``part`` (train, eval, or ``public~SPLIT``) of ``task``."""
    ds = config["datasets"][task]
    if part.startswith("public~"):
        split = part.split("~", 1)[1]
        sizes = {e["child"]["public_data"].get("size") for e in config["experiments"]
                 if e.get("child", {}).get("public_data", {}).get("task") == task
                 and e["child"]["public_data"]["split"] == split}
        if len(sizes) > 1:
            raise ValueError(f"experiments name public data {task}/{split} with different sizes {sorted(sizes)}")
        size = sizes.pop() if sizes else None
    elif part == "eval_mm":  # MNLI's mismatched evaluation set, beside the matched one (eval)
        split, size = mismatched_split(ds), ds.get("eval_size")
    else:
        split, size = ds.get(f"{part}_split"), ds.get(f"{part}_size")
    return canonical({"split": split, "size": size, "seed": ds["sample_seed"],
                      "k_shot_seed": ds.get("k_shot_seed"), "verify_size": ds["verify_size"]})


def paper_figures(runs: list[Run], paper: str) -> list[str]:
    """The figures a paper's runs can fill (names of :data:`privtune.report.figures.FIGURES`)."""
    mine = [r for r in runs if r.paper == paper]
    figures = []
    if any(not r.hparams and not r.zero_shot for r in mine):
        figures.append("child_tuning" if paper == "xu2021" else "metric_vs_epsilon")
    if any({"batch_size", "lr"} <= set(dict(r.hparams)) for r in mine):
        figures.append("hparam_heatmap")
    methods: dict[tuple, set] = {}
    for r in mine:
        if not r.hparams and r.method in DP_METHODS:
            methods.setdefault((r.task, r.model), set()).add(r.method)
    if any(len(m) > 1 for m in methods.values()):  # a comparison of fine-tuning methods
        figures.append("metric_vs_parameters")
    if any(r.private for r in mine):
        figures.append("epsilon_vs_steps")
    return figures
