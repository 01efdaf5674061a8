"""The whole DAG of both papers on the tiny preset (random-init tiny models, real data)."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import copy_workflow

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/tiny.yaml"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    work = copy_workflow(tmp_path_factory.mktemp("tiny"))
    env = {**os.environ, "PRIVTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PRIVTUNE_OFFLINE": "1"}
    out = subprocess.run(SNAKEMAKE, cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return work, env


def test_every_table_and_figure_exists_and_holds_numbers(tiny_run):
    work, _ = tiny_run
    for paper in ("li2022", "xu2021"):
        df = pd.read_csv(work / f"results/tables/{paper}.csv")
        assert len(df) > 0 and df["ours"].notna().all()
        assert pd.api.types.is_numeric_dtype(df["ours"])
        assert (work / f"results/tables/{paper}.md").read_text().count("|") > 20
    li = pd.read_csv(work / "results/tables/li2022.csv", dtype={"eps": str})
    dp = li[~li.eps.isin(["inf", "0"])]  # 0: the zero-shot row
    assert (dp.epsilon_spent <= dp.eps.astype(float) * 1.0001).all()  # never above the target
    assert (dp.epsilon_spent >= dp.eps.astype(float) * 0.95).all()    # and the budget is used
    figs = [f"results/figures/{f}.png" for f in ("li2022_metric_vs_epsilon", "li2022_hparam_heatmap",
                                                  "li2022_metric_vs_parameters",
                                                  "li2022_epsilon_vs_steps", "xu2021_child_tuning",
                                                  "xu2021_epsilon_vs_steps")] + ["results/benchmarks/clipping_cpu.png"]
    for fig in figs:
        img = Image.open(work / fig)
        assert img.size[0] > 300 and len(set(img.convert("L").get_flattened_data())) > 10  # not blank
        assert (work / fig).with_suffix(".svg").stat().st_size > 1000
    assert r"\begin{tabular}" in (work / "results/tables/xu2021.tex").read_text()
    bench = json.loads((work / "results/benchmarks/clipping_cpu.json").read_text())["records"]
    inter = [r for r in bench if r["method"] == "ours_bk"]  # the tiny preset sets interleave: 2
    assert inter and all(len(r["round_ratios"]) == 2 and r["time_ratio_interleaved"] > 0 for r in inter)
    sweep = li[li.variant.notna()]
    assert sorted(set(zip(sweep.batch_size, sweep.lr))) == [(8, 0.001), (8, 0.003), (16, 0.001), (16, 0.003)]
    zero = li[li.method == "zeroshot"]  # the untrained model with the prompt objective, ε = 0
    assert len(zero) == 1 and zero.eps.iloc[0] == "0" and zero.trainable_parameters.iloc[0] == 0
    claims = (work / "results/claims.md").read_text()
    assert claims.count("**Verdict: ") == 8 and "zero-shot" in claims


def test_report_holds_every_table_and_figure_with_captions(tiny_run):
    work, env = tiny_run
    out = subprocess.run([sys.executable, "-m", "snakemake", "--report", "results/report.zip",
                          "--configfile", "config/tiny.yaml"], cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    with zipfile.ZipFile(work / "results/report.zip") as z:
        names = {Path(n).name for n in z.namelist()}
        html = z.read("report/report.html").decode()
    for f in ("li2022_metric_vs_epsilon.png", "li2022_hparam_heatmap.png", "li2022_epsilon_vs_steps.png",
              "xu2021_child_tuning.png", "xu2021_epsilon_vs_steps.png", "clipping_cpu.png", "li2022.tex",
              "xu2021.md", "li2022.csv", "config.yaml", "software.tsv", "privacy_audit.json", "claims.md"):
        assert f in names
    # captions rendered with the config that produced each result
    assert "Produced by" in html and "li2022-sst2-sweep" in html and "Preset <strong>tiny</strong>" in html


def test_every_task_of_both_papers_trains_and_evaluates(tiny_run):
    """Each task with its metrics: QQP/MRPC F1, MNLI also on its "mismatched" file, STS-B correlations
    from a regression head, DART from its XML test file; QNLI and MNLI with the prompt objective."""
    work, _ = tiny_run
    want = {"sst2": {"accuracy"}, "qnli": {"accuracy"}, "mnli": {"accuracy", "accuracy_mm"},
            "qqp": {"accuracy", "f1"}, "e2e": {"bleu", "rouge_l"}, "dart": {"bleu", "rouge_l"},
            "cola": {"mcc", "accuracy"}, "rte": {"accuracy"}, "mrpc": {"accuracy", "f1"},
            "stsb": {"pearson", "spearman"}}
    for task, metrics in want.items():
        files = list(work.glob(f"results/*/{task}/*/*/eps~*/seed~0/metrics.json"))
        assert files, task
        row = json.loads(files[0].read_text())
        assert metrics <= set(row["metrics"]), (task, row["metrics"])
        assert all(isinstance(v, float) for v in row["metrics"].values())
    mnli = json.loads(next(work.glob("results/li2022/mnli/*/full/eps~8/seed~0/metrics.json")).read_text())
    assert mnli["objective"] == "prompt" and mnli["eval_examples_mm"] == mnli["eval_examples"] == 48


def test_every_fine_tuning_method_trains_and_evaluates(tiny_run):
    """full, LoRA, prefix, top2 and retrain on E2E under DP: each run's trainable-parameter count and noise
    record, the methods table (with RGP's published row marked not run) and the adapter of the prefix run."""
    work, _ = tiny_run
    base = work / "results/li2022/e2e/tiny-llama"
    counts = {}
    for method in ("full", "lora", "prefix", "top2", "retrain"):
        train = json.loads((base / method / "eps~8/seed~0/train_metrics.json").read_text())
        metrics = json.loads((base / method / "eps~8/seed~0/metrics.json").read_text())
        assert train["method"] == method and train["settings"]["method"] == method
        # data statistics and the noise drawn are not shipped; the noise as σ implies it is
        assert train["noise_norm_expected"] > 0 and not {"gradient_norm_mean", "noise_norm_mean"} & set(train)
        assert metrics["trainable_parameters"] == train["trainable_parameters"]
        assert {"bleu", "rouge_l"} <= set(metrics["metrics"])
        counts[method] = train["trainable_parameters"]
    assert counts["lora"] < counts["top2"] < counts["full"] == counts["retrain"]
    assert counts["prefix"] < counts["full"]
    assert (base / "prefix/eps~8/seed~0/model/prefix_adapter/adapter_config.json").exists()
    md = (work / "results/tables/li2022.md").read_text()
    section = md.split("fine-tuning methods")[1]
    for method in ("full", "lora", "prefix", "top2", "retrain"):
        assert f"| {method} " in section
    assert "not run: RGP not implemented" in section


def test_privacy_metadata_is_complete(tiny_run):
    work, _ = tiny_run
    rep = json.loads((work / "results/li2022/sst2/tiny-bert/full/eps~3/seed~0/privacy.json").read_text())
    for key in ("noise_multiplier", "sample_rate", "steps", "delta", "clip_norm", "sampling", "dataset_size",
                "epsilon_by_accountant", "versions"):
        assert key in rep
    assert rep["noise_multiplier"] > 0 and rep["epsilon"] <= 3.0


def test_second_run_does_nothing_and_one_setting_reruns_only_its_dependents(tiny_run):
    work, env = tiny_run
    out = subprocess.run([*SNAKEMAKE, "-n"], cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "Nothing to be done" in out.stdout + out.stderr
    cfg = yaml.safe_load(open(work / "config/tiny.yaml"))
    cola = next(e for e in cfg["experiments"] if e["name"] == "xu2021-cola")
    cola["train"]["lr"] = 2e-3  # Child-Tuning's learning rate only
    (work / "config/tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*SNAKEMAKE, "-n"], cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["train"] == 6  # 3 methods x 2 seeds of xu2021, nothing of li2022
    assert counts["tables"] == 1 and "prepare_model" not in counts and "fisher_mask" not in counts


def test_reported_epsilon_is_never_below_an_independent_accountant(tiny_run):
    """Re-derive ε of every DP run from its recorded σ, q, steps and δ with Google's dp-accounting."""
    import dp_accounting
    from dp_accounting import pld, rdp

    work, _ = tiny_run
    reports = list(work.glob("results/*/*/*/*/eps~*/seed~*/privacy.json"))
    private = [json.loads(p.read_text()) for p in reports]
    private = [r for r in private if r.get("private")]
    assert len(private) >= 3
    for rep in private:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            rep["sample_rate"], dp_accounting.GaussianDpEvent(rep["noise_multiplier"])), rep["steps"])
        for acc in (rdp.RdpAccountant(), pld.PLDAccountant()):
            independent = acc.compose(event).get_epsilon(rep["delta"])
            assert rep["epsilon"] >= independent * (1 - 1e-9), (rep, type(acc).__name__, independent)


def test_privacy_audit_covers_every_dp_run(tiny_run):
    work, _ = tiny_run
    audit = json.loads((work / "results/privacy_audit.json").read_text())
    private = [r for r in audit.values() if r["private"]]
    cfg = yaml.safe_load(open(work / "config/tiny.yaml"))
    grid = [len(e["sweep"]["batch_size"]) * len(e["sweep"]["lr"]) if "sweep" in e else 1 for e in cfg["experiments"]]
    assert len(private) == sum(len(e["models"]) * len(e["methods"]) * len(e["seeds"]) * g *
                               len([x for x in e["epsilons"] if x != "inf"]) for e, g in zip(cfg["experiments"], grid))
    assert all(r["ok"] for r in audit.values())
    assert all(r["reported"] >= max(r["independent"].values()) for r in private)


@pytest.mark.parametrize("mutate,key", [
    (lambda c: c["experiments"][0]["train"].update(delta=1.5), "delta"),
    (lambda c: next(e for e in c["experiments"] if e["name"] == "xu2021-cola")["child"].update(p_f=0), "p_f"),
    (lambda c: c["experiments"][0].update(models=["roberta-huge"]), "roberta-huge"),
    (lambda c: c["datasets"]["sst2"].update(train_size="all"), "train_size"),
])
def test_bad_config_fails_before_any_job_and_leaves_results_intact(tiny_run, mutate, key):
    work, env = tiny_run
    snapshot = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (work / "results").rglob("*") if p.is_file()}
    cfg = yaml.safe_load(open(work / "config/tiny.yaml"))
    mutate(cfg)
    (work / "bad.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "bad.yaml"],
                         cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and key in out.stdout + out.stderr
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (work / "results").rglob("*") if p.is_file()} \
        == snapshot
