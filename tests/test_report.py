"""Tables (paper layouts, Markdown/CSV/LaTeX), figures (PNG and SVG), provenance, sweeps,
GPU claiming and the cluster profiles."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from PIL import Image
from snakemake.utils import validate

from conftest import ROOT, copy_workflow
from privtune.training import gpus
from privtune.dp import accounting
from privtune.pipeline import Run, expand_runs, paper_figures, run_settings
from privtune.report.provenance import provenance_text
from privtune.report import figures, tables
from privtune.report.provenance import software_versions, write_provenance

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")


def _metrics(tmp_path, task, model, method, eps, seed, metrics, variant="", hparams=None):
    path = tmp_path / f"{task}-{model}-{method}-{eps}-{seed}-{variant.replace('~', '')}.json"
    path.write_text(json.dumps({"task": task, "model": model, "method": method, "eps": eps, "seed": seed,
                                "metrics": metrics, "epsilon_spent": None if eps == "inf" else float(eps) * 0.99,
                                "noise_multiplier": 0.7, "trainable_parameters": 1000, "variant": variant,
                                "hparams": hparams or {}}))
    return path


@pytest.fixture
def li_files(tmp_path):
    files = [_metrics(tmp_path, "sst2", "minilm", "full", eps, seed, {"accuracy": acc})
             for eps, seed, acc in [("3", 0, 0.80), ("3", 1, 0.84), ("8", 0, 0.86), ("inf", 0, 0.90)]]
    files += [_metrics(tmp_path, "e2e", "gpt2", "full", eps, 0, {"bleu": b, "rouge_l": 60.0})
              for eps, b in [("3", 55.0), ("8", 58.0), ("inf", 64.0)]]
    files += [_metrics(tmp_path, "sst2", "minilm", "full", "8", 0, {"accuracy": 0.5 + bs / 1000 + lr},
                       f"bs~{bs}_lr~{lr:g}", {"batch_size": bs, "lr": lr})
              for bs in (32, 64) for lr in (1e-4, 1e-3)]
    return files


PUBLISHED_HEADER = "paper,table,arxiv,task,model,method,epsilon,metric,value,checked,source\n"


@pytest.fixture
def published_dir(tmp_path, monkeypatch):
    """A published-values folder of made-up test numbers (never a paper's): two checked, one not."""
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "li2022.csv").write_text(PUBLISHED_HEADER + "".join(
        f"li2022,Table 9,0000.00000v1,e2e,gpt2,full,{eps},bleu,{v},{checked},test value\n"
        for eps, v, checked in [("3", 11.5, "yes"), ("8", 22.5, "yes"), ("inf", 33.5, "no")]))
    (folder / "xu2021.csv").write_text(PUBLISHED_HEADER)
    monkeypatch.setenv("PRIVTUNE_PUBLISHED_DIR", str(folder))
    return folder


def test_published_values_name_their_table_and_arxiv_version(published_dir):
    """A row without its table or arXiv version, or with checked other than yes/no, is refused naming the
    file and line; an unchecked value is marked."""
    good = (published_dir / "li2022.csv").read_text()
    assert tables.published("li2022").checked.tolist() == [True, True, False]
    for bad, col in (("li2022,,0000.00000v1,e2e,gpt2,full,3,bleu,1.0,yes,x", "table"),
                     ("li2022,Table 9,,e2e,gpt2,full,3,bleu,1.0,yes,x", "arxiv"),
                     ("li2022,Table 9,0000.00000v1,e2e,gpt2,full,3,bleu,1.0,maybe,x", "checked")):
        (published_dir / "li2022.csv").write_text(good + bad + "\n")
        with pytest.raises(ValueError, match=rf"li2022.csv, line\(s\) \[5\]: column '{col}'"):
            tables.published("li2022")
    for bad, what in (("li2022,Table 9,0000.00000v1,e2e,gpt2,full,3,bleu,,yes,x", "'value' must be a number"),
                      ("li2022,Table 9,0000.00000v1,e2e,gpt2,full,e,bleu,1.0,yes,x", "'value' must be a number"),
                      ("li2022,Table 9,0000.00000v1,e2e,gpt2,full,3,bleu,2.0,yes,x", "the same task")):
        (published_dir / "li2022.csv").write_text(good + bad + "\n")
        with pytest.raises(ValueError, match=what):
            tables.published("li2022")
    (published_dir / "li2022.csv").write_text("paper,task,value\nli2022,e2e,1.0\n")
    with pytest.raises(ValueError, match="missing columns"):
        tables.published("li2022")


def test_the_shipped_published_values_all_carry_their_provenance(monkeypatch):
    monkeypatch.delenv("PRIVTUNE_PUBLISHED_DIR", raising=False)
    for paper in ("li2022", "xu2021"):
        df = tables.published(paper)  # refuses a row without table, arXiv version or checked
        assert list(df.columns) == tables.PUBLISHED_COLUMNS


def test_tables_in_the_papers_layouts_with_published_values_beside_ours(li_files, tmp_path, published_dir):
    df = tables.write_tables(li_files, "li2022", tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.tex")
    md, tex = (tmp_path / "t.md").read_text(), (tmp_path / "t.tex").read_text()
    # mean ± sd over the two ε=3 seeds (80, 84) in the classification table
    assert "82.00 ± 2.83 (n=2)" in md
    cls = tables.paper_table(df, "li2022", tables.LAYOUTS["li2022"][0])
    assert list(cls.columns) == ["source", "model", "method", "ε", "SST-2 acc"]
    assert set(cls.source) == {"ours"}  # no verified published SST-2 number in the repository
    e2e = tables.paper_table(df, "li2022", tables.LAYOUTS["li2022"][1])
    paper_rows = e2e[e2e.source == "paper"]
    # the published E2E BLEU (the fixture's test values) beside ours, on the paper's model; unchecked marked
    assert list(paper_rows["E2E BLEU"]) == ["11.5", "22.5", "33.5" + tables.UNCHECKED_MARK]
    assert tables.UNCHECKED_NOTE in md
    assert list(e2e[e2e.source == "ours"]["E2E BLEU"]) == ["55.00", "58.00", "64.00"]
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"$\varepsilon$" in tex and "22.5" in tex
    # the sweep's grid points stay out of the paper tables and the summary, and get their own section
    assert len(tables.main_runs(df)[tables.main_runs(df).task == "sst2"]) == 4
    assert "Grid points" in md and set(df.variant) == {"", "bs~32_lr~0.0001", "bs~32_lr~0.001",
                                                                 "bs~64_lr~0.0001", "bs~64_lr~0.001"}
    csv = pd.read_csv(tmp_path / "t.csv")
    assert {"published", "published_source", "batch_size", "lr", "trainable_parameters"} <= set(csv.columns)


def _not_blank(png):
    img = Image.open(png)
    return img.size[0] > 300 and len(set(img.convert("L").get_flattened_data())) > 10


def test_each_figure_is_written_as_png_and_svg_with_its_numbers(li_files, tmp_path):
    tables.write_tables(li_files, "li2022", tmp_path / "t.md", tmp_path / "t.csv")
    for name, value in (("metric_vs_epsilon", "86.0"), ("hparam_heatmap", "56.0")):
        out = tmp_path / f"{name}.png"
        figures.FIGURES[name]([tmp_path / "t.csv"], out)
        assert _not_blank(out)
        assert value in out.with_suffix(".svg").read_text()  # the numbers are drawn, not just axes


def test_child_tuning_bars_show_the_seed_spread(tmp_path):
    files = [_metrics(tmp_path, "cola", "minilm", m, "inf", s, {"mcc": v})
             for m, vals in (("vanilla", (0.30, 0.34)), ("ct_f", (0.35, 0.37)), ("ct_d", (0.40, 0.40)))
             for s, v in enumerate(vals)]
    tables.write_tables(files, "xu2021", tmp_path / "t.md", tmp_path / "t.csv")
    figures.child_tuning_bars([tmp_path / "t.csv"], tmp_path / "ct.png")
    svg = (tmp_path / "ct.svg").read_text()
    assert _not_blank(tmp_path / "ct.png") and "32.0" in svg and "n=2" in svg


def test_epsilon_curve_rises_to_the_target_and_counts_a_prior_fisher_from_step_zero():
    q, steps, delta = 0.01, 300, 1e-5
    sigma = accounting.calibrate_noise(3.0, delta, q, steps)
    rep = {"private": True, "steps": steps, "sample_rate": q, "noise_multiplier": sigma, "delta": delta,
           "events": [{"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "label": "training"}]}
    ks, eps = figures.epsilon_curve(rep)
    assert ks[0] == 0 and eps[0] == 0.0 and ks[-1] == steps
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert 0.95 * 3.0 <= eps[-1] <= 3.0 * 1.0001
    prior = {"noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1, "label": "fisher"}
    ks2, eps2 = figures.epsilon_curve({**rep, "events": [prior, *rep["events"]]})
    fisher_eps = accounting.epsilon([accounting.GaussianEvent(2.0, 1.0, 1)], delta)
    assert fisher_eps > 0 and eps2[0] == pytest.approx(fisher_eps)
    assert eps2[-1] > eps[-1]


def test_epsilon_and_benchmark_figures(tmp_path):
    rep = {"private": True, "steps": 20, "sample_rate": 0.1, "noise_multiplier": 1.0, "delta": 1e-5,
           "target_epsilon": 8.0, "events": []}
    run = tmp_path / "results/li2022/sst2/m/full/eps~8/seed~0"
    run.mkdir(parents=True)
    (run / "privacy.json").write_text(json.dumps(rep))
    figures.epsilon_vs_steps([run / "privacy.json"], tmp_path / "eps.png")
    assert _not_blank(tmp_path / "eps.png") and "sst2/m/full" in (tmp_path / "eps.svg").read_text()
    recs = [{"shape": s, "method": m, "status": "ok", "parameters": p, "time_s": t, "peak_mb": mb, "batch": 8,
             "seq": 64} for s, p in (("a", 1e6), ("b", 4e6))
            for m, t, mb in (("nonprivate", 1.0, 100.0), ("ours_bk", 1.2, 105.0), ("opacus_hooks", 3.0, 400.0))]
    recs.append({"shape": "b", "method": "opacus_ghost", "status": "error", "error": "tied", "batch": 8, "seq": 64})
    from privtune.bench.clipping import with_ratios
    (tmp_path / "b.json").write_text(json.dumps({"device": "cpu", "batch": 8, "seq": 64,
                                                 "records": with_ratios(recs)}))
    figures.benchmark([tmp_path / "b.json"], tmp_path / "bench.png")
    svg = (tmp_path / "bench.svg").read_text()
    assert _not_blank(tmp_path / "bench.png") and "b/opacus_ghost: error" in svg and "1.2" in svg


def test_sweep_expands_to_grid_points_with_their_own_paths_and_settings():
    cfg = yaml.safe_load(open(ROOT / "config/tiny.yaml"))
    validate(cfg, SCHEMA)
    runs = [r for r in expand_runs(cfg) if r.experiment == "li2022-sst2-sweep"]
    assert len(runs) == 4 and {r.variant for r in runs} == {"bs~8_lr~0.001", "bs~8_lr~0.003",
                                                           "bs~16_lr~0.001", "bs~16_lr~0.003"}
    r = next(r for r in runs if r.variant == "bs~16_lr~0.003")
    assert r.directory == "results/li2022/sst2/tiny-bert/full/bs~16_lr~0.003/eps~8/seed~0"
    s = run_settings(cfg, r)
    assert s["batch_size"] == 16 and s["lr"] == 0.003 and s["physical_batch_size"] == 8
    small = run_settings(cfg, next(r for r in runs if r.variant == "bs~8_lr~0.001"))
    assert small["batch_size"] == 8 and small["physical_batch_size"] == 8

    class WC(dict):
        __getattr__ = dict.__getitem__
    wc = WC(paper="li2022", task="sst2", model="tiny-bert", method="full/bs~16_lr~0.003", eps="8", seed="0")
    assert Run.from_wildcards(cfg, wc) == r
    assert paper_figures(expand_runs(cfg), "li2022") == ["metric_vs_epsilon", "hparam_heatmap",
                                                         "metric_vs_parameters", "epsilon_vs_steps"]
    assert paper_figures(expand_runs(cfg), "xu2021") == ["child_tuning", "epsilon_vs_steps"]
    text = provenance_text(cfg, "li2022")
    assert "li2022-sst2-sweep" in text and "sweep batch_size [8, 16]" in text and "xu2021" not in text


def test_provenance_records_config_and_versions(tmp_path):
    write_provenance({"preset": "x", "a": [1, 2]}, tmp_path / "c.yaml", tmp_path / "v.tsv")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == {"preset": "x", "a": [1, 2]}
    versions = dict(software_versions())
    import torch
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert "opacus" in (tmp_path / "v.tsv").read_text()


def test_gpu_claims_never_share_a_device(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpus.claim(0) == [] and gpus.visible_gpus() == ["0", "1"]
    first = gpus.claim(1, devices=["0", "1"], lock_dir=tmp_path)
    # another process cannot take the locked GPU
    code = ("import sys; from privtune.training import gpus; "
            f"print(gpus.claim(1, devices=['0', '1'], lock_dir={str(tmp_path)!r}, timeout_s=0))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert first == ["0"] and other.stdout.strip() == "['1']"
    with pytest.raises(TimeoutError, match="no 2 free GPU"):
        gpus.claim(2, devices=["0", "1"], lock_dir=tmp_path, timeout_s=0, poll_s=0)
    with pytest.raises(RuntimeError, match="asks for 3 GPUs"):
        gpus.claim(3, devices=["0", "1"], lock_dir=tmp_path)


@pytest.mark.parametrize("profile,configfile,expect", [
    ("profiles/slurm", "config/paper.yaml", ["slurm_partition=gpu", "gpu=1", "runtime=1440"]),
    ("profiles/slurm", "config.yaml", ["slurm_partition=cpu", "gpu=0"]),  # no GPU asked: the cpu partition
    ("profiles/gpu", "config.yaml", ["gpu=1"]),
])
def test_cluster_and_gpu_profiles_are_valid(tmp_path, profile, configfile, expect):
    work = copy_workflow(tmp_path)
    out = subprocess.run([sys.executable, "-m", "snakemake", "--profile", profile, "-n", "--configfile", configfile],
                         cwd=work, capture_output=True, text=True,
                         env={"PATH": f"{ROOT / '.venv/bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                              "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    train = out.stdout.split("rule train:")[1].split("\n\n")[0]
    for token in expect:
        assert token in train, train


def test_a_cell_whose_epsilon_does_not_hold_is_marked_with_a_footnote(tmp_path):
    """guarantee_holds false in metrics.json: the long CSV carries it, the Markdown cells get † and the note."""
    from privtune.io import write_json
    from privtune.report.tables import UNACCOUNTED_MARK, UNACCOUNTED_NOTE, write_tables

    files = []
    for eps, holds in (("8", False), ("3", True)):
        f = tmp_path / f"m{eps}.json"
        write_json(f, {"task": "sst2", "model": "m", "method": "full", "eps": eps, "seed": 0,
                       "metrics": {"accuracy": 0.8}, "guarantee_holds": holds})
        files.append(f)
    df = write_tables(files, "li2022", tmp_path / "t.md", tmp_path / "t.csv")
    assert list(df.sort_values("eps").guarantee_holds) == [True, False]
    md = (tmp_path / "t.md").read_text()
    assert f"80.00{UNACCOUNTED_MARK}" in md and UNACCOUNTED_NOTE in md
    write_tables(files[1:], "li2022", tmp_path / "u.md", tmp_path / "u.csv")  # the ε = 3 run alone: no mark
    assert UNACCOUNTED_MARK not in (tmp_path / "u.md").read_text()


def test_error_bars_are_the_seed_spread_or_the_evaluation_interval():
    import pandas as pd

    from privtune.report.figures import error_bars

    seeds = pd.DataFrame({"ours": [70.0, 74.0], "ci_low": [68.0, 72.0], "ci_high": [72.0, 76.0]})
    one = pd.DataFrame({"ours": [80.0], "ci_low": [77.5], "ci_high": [82.0]})
    bare = pd.DataFrame({"ours": [60.0], "ci_low": [float("nan")], "ci_high": [float("nan")]})
    bars = error_bars([seeds, one, bare, one.iloc[:0]])
    assert bars.shape == (2, 4) and bars[:, 3].tolist() == [0.0, 0.0]
    assert bars[:, 0].tolist() == pytest.approx([2 ** 1.5, 2 ** 1.5])  # std of 70, 74
    assert bars[:, 1].tolist() == pytest.approx([2.5, 2.0]) and bars[:, 2].tolist() == [0.0, 0.0]
