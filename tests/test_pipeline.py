"""Config validation, run expansion and dry runs of every preset (offline)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from conftest import ROOT, copy_workflow
from privtune.pipeline import Run, expand_runs, run_settings

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def load(name):
    cfg = yaml.safe_load(open(ROOT / name))
    validate(cfg, SCHEMA)
    return cfg


def cola(cfg):
    """The quick preset's non-private Child-Tuning experiment (STS-B)."""
    return next(e for e in cfg["experiments"] if e["name"] == "xu2021-stsb")


def test_quick_preset_expands_to_both_papers():
    runs = expand_runs(load("config.yaml"))
    assert {r.paper for r in runs} == {"li2022", "xu2021"}
    assert {r.eps for r in runs if r.task == "sst2"} == {"0", "3", "8", "inf"}  # 0: the zero-shot row
    assert {r.method for r in runs if r.paper == "xu2021"} == {"vanilla", "ct_f", "ct_d"}


def test_run_settings_layering():
    cfg = load("config.yaml")
    runs = {(r.task, r.eps): r for r in expand_runs(cfg)}
    dp = run_settings(cfg, runs[("sst2", "3")])
    nonpriv = run_settings(cfg, runs[("sst2", "inf")])
    assert dp["epsilon"] == 3.0 and dp["clip_norm"] == 0.1 and dp["lr"] == 5e-4
    assert nonpriv["epsilon"] is None and nonpriv["lr"] == 5e-5  # nonprivate_train override
    ct = run_settings(cfg, [r for r in expand_runs(cfg) if r.method == "ct_f"][0])
    assert ct["child"] == "ct_f" and ct["p_f"] == 0.2
    assert Run("x", "li2022", "sst2", "m", "full", "3", 0).directory == "results/li2022/sst2/m/full/eps~3/seed~0"


@pytest.mark.parametrize("mutate,key", [
    (lambda c: c["experiments"][0].update(epsilons=[-1]), "epsilons"),
    (lambda c: c["experiments"][0]["train"].update(lr="fast"), "lr"),
    (lambda c: c["experiments"][0].update(task="Image-Net"), "task"),
    (lambda c: cola(c)["child"].update(p_d=1.5), "p_d"),
    (lambda c: c.update(threads=0), "threads"),
])
def test_schema_rejects_bad_values_naming_the_key(mutate, key):
    cfg = copy.deepcopy(load("config.yaml"))
    mutate(cfg)
    with pytest.raises(Exception) as err:
        validate(cfg, SCHEMA)
    assert key in str(err.value) or key in repr(err.value)


def test_an_unknown_task_is_named_with_where_to_declare_one():
    cfg = copy.deepcopy(load("config.yaml"))
    cfg["experiments"][0]["task"] = "imagenet"
    with pytest.raises(ValueError, match="unknown task 'imagenet'.*user_tasks"):
        expand_runs(cfg)


def test_unknown_model_in_an_experiment_is_named():
    cfg = load("config.yaml")
    cfg["experiments"][0]["models"] = ["roberta-huge"]
    with pytest.raises(ValueError, match="roberta-huge"):
        expand_runs(cfg)


@pytest.mark.parametrize("configfile,min_train", [("config.yaml", 9), ("config/paper.yaml", 150),
                                                  ("config/tiny.yaml", 11), ("config/claims.yaml", 20)])
def test_dry_run_lists_the_grid_offline(tmp_path, configfile, min_train):
    work = copy_workflow(tmp_path)
    out = subprocess.run([*SNAKEMAKE, "-n", "--configfile", configfile], cwd=work, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["train"] >= min_train and counts["evaluate"] == counts["train"]


def test_invalid_config_fails_before_any_job(tmp_path):
    work = copy_workflow(tmp_path)
    cfg = yaml.safe_load(open(work / "config.yaml"))
    cfg["experiments"][0]["epsilons"] = [0]
    (work / "bad.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*SNAKEMAKE, "-n", "--configfile", "bad.yaml"], cwd=work, capture_output=True, text=True)
    assert out.returncode != 0
    msg = out.stdout + out.stderr
    assert "['epsilons'][0]" in msg and "exclusiveMinimum" in msg
    assert not (Path(work) / "results").exists()


@pytest.mark.parametrize("child,match", [
    ({"fisher_source": "dp"}, "fisher_epsilon"),
    ({"fisher_source": "dp", "fisher_epsilon": 8.0}, "no budget for training"),
    ({"fisher_source": "public"}, "public_data"),
    ({"fisher_source": "public", "public_data": {"task": "rte", "split": "dev"}}, "'rte' has no entry under datasets"),
])
def test_child_tuning_mask_sources_are_checked_before_any_job(child, match):
    cfg = load("config.yaml")
    cfg["experiments"].append({**cola(cfg), "name": "dp-ct", "epsilons": [8], "child": child})
    with pytest.raises(ValueError, match=match):
        expand_runs(cfg)


def _dp_cola(cfg, child=None, **train):
    e = {**cola(cfg), "name": "dp-ct", "epsilons": [8],
         "train": {"batch_size": 32, "physical_batch_size": 32, "epochs": 1, "lr": 5e-4, **train}}
    if child is not None:
        e["child"] = child
    cfg["experiments"].append(e)
    return cfg


@pytest.mark.parametrize("child,train,match", [
    ({"fisher_source": "train"}, {}, r"fisher_source: train.*fisher_source: dp"),
    ({"fisher_source": "dp", "fisher_epsilon": 1.0}, {"sampling": "shuffle"}, r"sampling: shuffle.*poisson"),
    ({"fisher_source": "dp", "fisher_epsilon": 1.0}, {"verify_engine": False}, r"verify_engine: false"),
])
def test_settings_whose_epsilon_does_not_hold_are_refused_under_dp(child, train, match):
    """Each names the key and the alternative, before any job; allow_unaccounted lets it run (marked)."""
    with pytest.raises(ValueError, match=f"experiment 'dp-ct'.*{match}.*allow_unaccounted"):
        expand_runs(_dp_cola(load("config.yaml"), child, **train))
    assert expand_runs(_dp_cola(load("config.yaml"), child, allow_unaccounted=True, **train))


def test_under_dp_the_mask_defaults_to_the_dp_fisher():
    """No fisher_source: a DP experiment's mask is the DP Fisher (its ε covers it), which needs its ε;
    a non-private one keeps the paper's (the training data, no noise)."""
    with pytest.raises(ValueError, match="fisher_source is dp .the default.*fisher_epsilon"):
        expand_runs(_dp_cola(load("config.yaml"), {"p_d": 0.3}))
    cfg = _dp_cola(load("config.yaml"), {"p_d": 0.3, "fisher_epsilon": 1.0})
    dp = next(r for r in expand_runs(cfg) if r.experiment == "dp-ct" and r.method == "ct_d")
    assert "/dp-eps1/" in dp.mask_path(cfg)
    plain = next(r for r in expand_runs(cfg) if r.experiment == "xu2021-stsb" and r.method == "ct_d")
    assert "/train/" in plain.mask_path(cfg)


def test_mask_sources_have_their_own_rules_and_paths(tmp_path):
    work = copy_workflow(tmp_path)
    cfg = yaml.safe_load(open(work / "config.yaml"))
    cola(cfg)["child"] = {"p_d": 0.3, "fisher_source": "public",
                          "public_data": {"task": "sst2", "split": "dev", "size": 200}}
    (work / "pub.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*SNAKEMAKE, "-n", "-p", "--configfile", "pub.yaml"], cwd=work, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "results/data/sst2/public~dev.jsonl" in out.stdout
    assert "results/fisher/stsb/minilm/public-sst2-dev/pd~0.3/seed~0/mask.pt" in out.stdout
    runs = [r for r in expand_runs(load("config.yaml")) if r.method == "ct_d"]
    assert runs[0].mask_path(load("config.yaml")).startswith("results/fisher/stsb/minilm/train/")


def test_a_preset_named_on_the_command_line_replaces_the_quick_preset(tmp_path):
    """--configfile config/paper.yaml must not inherit the quick preset's data sizes or models."""
    work = copy_workflow(tmp_path)
    out = subprocess.run([*SNAKEMAKE, "--cores", "1", "results/provenance/config.yaml", "--configfile",
                          "config/paper.yaml"], cwd=work, capture_output=True, text=True,
                         env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load((work / "results/provenance/config.yaml").read_text())
    assert cfg["preset"] == "paper" and cfg["datasets"]["sst2"]["train_size"] is None
    assert cfg["datasets"]["e2e"]["eval_size"] is None and "minilm" not in cfg["models"]
    assert cfg["benchmark"]["in_report"] is False


def test_fine_tuning_methods_reach_the_run_settings():
    cfg = load("config/tiny.yaml")
    runs = {(r.experiment, r.method, r.eps): r for r in expand_runs(cfg)}
    lora = run_settings(cfg, runs[("li2022-e2e-methods", "lora", "8")])
    assert lora["method"] == "lora" and set(lora["method_options"]) == {"r", "alpha", "dropout", "target_modules"}
    assert run_settings(cfg, runs[("li2022-e2e", "full", "8")])["method"] == "full"
    assert "method" not in run_settings(cfg, runs[("xu2021-cola", "ct_f", "inf")])  # Child-Tuning's own
    paper = expand_runs(load("config/paper.yaml"))
    for task in ("e2e", "dart"):
        assert {(r.method, r.eps) for r in paper if r.task == task and r.model == "gpt2"} == {
            (m, e) for m in ("full", "lora", "prefix", "top2", "retrain") for e in ("3", "8", "inf")}


@pytest.mark.parametrize("change, match", [
    ({"task": "stsb", "paper": "li2022"}, "regression"),
    ({"methods": ["lora"]}, "not supported with objective: prompt"),
    ({"prompt": {"label_words": ["a", "b", "c"]}}, "3 words; task sst2 has 2 labels"),
])
def test_prompt_objective_is_checked_before_any_job(change, match):
    cfg = load("config/tiny.yaml")
    exp = next(e for e in cfg["experiments"] if e["name"] == "li2022-sst2")
    exp.update(change)
    if exp["task"] == "stsb":
        exp.pop("prompt")
    with pytest.raises(ValueError, match=match):
        expand_runs(cfg)


def test_objective_and_mismatched_evaluation_reach_the_jobs():
    from privtune.pipeline import data_spec, extra_eval_files

    cfg = load("config/paper.yaml")
    runs = expand_runs(cfg)
    sst2 = next(r for r in runs if r.task == "sst2" and r.eps == "8" and not r.hparams)
    assert run_settings(cfg, sst2)["objective"] == "prompt"
    assert sst2.eval_spec(cfg)["meta"]["objective"] == "prompt"
    assert extra_eval_files("mnli") == ["results/data/mnli/eval_mm.jsonl"] and extra_eval_files("sst2") == []
    assert data_spec(cfg, "mnli", "eval_mm")["split"] == "dev_mismatched"
    tiny = load("config/tiny.yaml")
    assert data_spec(tiny, "mnli", "eval_mm") == data_spec(tiny, "mnli", "eval")  # the mirror has no mm
    tiny["datasets"]["mnli"]["eval_mm_split"] = None
    assert data_spec(tiny, "mnli", "eval_mm")["split"] == "test_mismatched"


def test_zero_shot_runs_read_no_data_and_spend_no_epsilon():
    cfg = load("config.yaml")
    runs = expand_runs(cfg)
    zs = [r for r in runs if r.zero_shot]
    assert {(r.task, r.eps) for r in zs} == {("sst2", "0"), ("e2e", "0")}
    r = next(r for r in zs if r.task == "sst2")
    assert not r.private and r.directory == "results/li2022/sst2/minilm/zeroshot/eps~0/seed~0"
    s = run_settings(cfg, r)
    assert s["zero_shot"] is True and s["epsilon"] is None and s["objective"] == "prompt"
    bad = copy.deepcopy(cfg)
    next(e for e in bad["experiments"] if e["name"] == "li2022-sst2").update(objective="head")
    with pytest.raises(ValueError, match="zero_shot needs objective: prompt"):
        expand_runs(bad)


def test_sweeps_over_objective_and_clipping_norm_have_their_own_paths():
    quick = load("config/claims.yaml")
    head = next(r for r in expand_runs(quick) if r.experiment == "li2022-sst2-head")
    assert head.directory == "results/li2022/sst2/minilm/full/obj~head/eps~8/seed~0"
    assert run_settings(quick, head).get("objective", "head") == "head"
    assert head.eval_spec(quick)["meta"]["objective"] == "head"
    cfg = load("config/claims.yaml")  # its li2022-sst2-clip experiment: C = 10 beside li2022-sst2's C = 0.1
    runs = expand_runs(cfg)
    clip = next(r for r in runs if r.experiment == "li2022-sst2-clip")
    assert clip.directory == "results/li2022/sst2/minilm/full/C~10/eps~8/seed~0"
    assert run_settings(cfg, clip)["clip_norm"] == 10.0 and run_settings(cfg, clip)["objective"] == "prompt"
    grid = [r for r in runs if r.experiment == "li2022-sst2-sweep"]
    assert sorted({r.variant for r in grid}) == ["bs~1024_lr~0.0005", "bs~1024_lr~5e-05", "bs~64_lr~0.0005",
                                              "bs~64_lr~5e-05"]
    assert len({r.directory for r in runs}) == len(runs)


def test_building_the_runs_imports_no_torch():
    """The workflow's DAG (common.smk imports privtune.pipeline) needs no deep-learning stack: every
    preset expands and is checked (objectives, methods, guarantees) without importing torch."""
    code = ("import sys, yaml\nfrom snakemake.utils import validate\n"
            "from privtune.pipeline import expand_runs, run_settings\n"
            "for name in ('config.yaml', 'config/tiny.yaml', 'config/paper.yaml', 'config/claims.yaml'):\n"
            "    cfg = yaml.safe_load(open(name))\n"
            "    validate(cfg, 'workflow/schemas/config.schema.yaml')  # as the Snakefile does: fills defaults\n"
            "    [run_settings(cfg, r) for r in expand_runs(cfg)]\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'opacus'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_runs_are_found_by_wildcards_without_re_expanding_the_config(monkeypatch):
    """The DAG asks for one run per job: the config is expanded once (the lookup was quadratic)."""
    from types import SimpleNamespace

    import privtune.pipeline as pipeline

    cfg = load("config/paper.yaml")
    runs = expand_runs(cfg)
    calls = []
    real = pipeline.expand_runs
    monkeypatch.setattr(pipeline, "expand_runs", lambda c: calls.append(1) or real(c))
    pipeline._INDEX.clear()
    for r in runs:
        wc = SimpleNamespace(paper=r.paper, task=r.task, model=r.model, method=r.method_dir, eps=r.eps,
                             seed=str(r.seed), items=lambda: {})
        assert Run.from_wildcards(cfg, wc) == r
    assert len(calls) == 1 and len(runs) > 100
    cfg["experiments"] = cfg["experiments"][:1]  # a changed config is expanded anew
    first = runs[0]
    wc = SimpleNamespace(paper=first.paper, task=first.task, model=first.model, method=first.method_dir,
                         eps=first.eps, seed=str(first.seed), items=lambda: {})
    Run.from_wildcards(cfg, wc)
    assert len(calls) == 2


@pytest.mark.parametrize("preset", ["config.yaml", "config/tiny.yaml", "config/claims.yaml", "config/paper.yaml"])
def test_no_nonprivate_run_resolves_to_poisson_sampling(preset):
    """Non-private baselines take nonprivate_defaults (shuffled epochs, a decaying lr), resolved in
    run_settings alone: the DP defaults (Poisson sampling) reach no non-private run of any preset."""
    cfg = load(preset)
    baselines = [r for r in expand_runs(cfg) if r.eps == "inf"]
    assert baselines
    for r in baselines:
        s = run_settings(cfg, r)
        assert s["sampling"] == "shuffle", r.directory
    dp = [run_settings(cfg, r) for r in expand_runs(cfg) if r.private]
    assert all(s["sampling"] == "poisson" or s.get("allow_unaccounted") for s in dp)


def test_an_experiment_cannot_hand_its_dp_sampling_to_its_baseline():
    cfg = copy.deepcopy(load("config.yaml"))
    e = cfg["experiments"][0]
    e["train"]["sampling"] = "poisson"
    e.pop("nonprivate_train", None)
    runs = {r.eps: r for r in expand_runs(cfg) if r.experiment == e["name"]}
    s = run_settings(cfg, runs["inf"])
    assert s["sampling"] == "shuffle" and s["lr_schedule"] == "linear"
    assert run_settings(cfg, runs["8"])["sampling"] == "poisson"
