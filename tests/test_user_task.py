"""A user's own dataset (``user_tasks:``): declared in the config, read through Hugging Face datasets from
local files (offline), and run through the same stages, tables and report as the papers' tasks."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import copy_workflow
from privtune import tasks
from privtune.data.download import MalformedDataError
from privtune.data.readers import read_split

REVIEWS = {"kind": "classification", "files": {"train": "reviews_train.csv", "dev": "reviews_dev.csv"},
           "text": ["review"], "label": "sentiment", "labels": ["negative", "positive"], "metrics": ["accuracy", "f1"]}


@pytest.fixture
def registry(monkeypatch):
    """The task registry, restored after the test."""
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    for mod in ("privtune.report.figures", "privtune.report.tables", "privtune.report.claims",
                "privtune.report.evidence"):
        if mod in sys.modules and hasattr(sys.modules[mod], "TASKS"):
            monkeypatch.setattr(sys.modules[mod], "TASKS", tasks.TASKS)
    return tasks.TASKS


def write_reviews(folder, n=40):
    good = ["a fine film", "warm and funny", "a joy to watch", "great acting"]
    bad = ["dull and long", "a waste of time", "badly written", "the worst this year"]
    rows = [(good[i % 4] if i % 2 else bad[i % 4], "positive" if i % 2 else "negative") for i in range(n)]
    for split, part in (("train", rows), ("dev", rows[: n // 2])):
        pd.DataFrame(part, columns=["review", "sentiment"]).to_csv(folder / f"reviews_{split}.csv", index=False)


def test_a_csv_classification_task_reads_names_and_ids(tmp_path, monkeypatch, registry):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_reviews(tmp_path, 6)
    tasks.register_config_tasks({"user_tasks": {"reviews": REVIEWS}})
    recs = read_split("reviews", "train", tmp_path / "no-such-data-dir")
    assert [r["label"] for r in recs] == [0, 1, 0, 1, 0, 1]
    assert recs[1] == {"text_a": "warm and funny", "text_b": None, "label": 1}
    assert tasks.task("reviews").metrics == ("accuracy", "f1") and tasks.task_info("reviews")["num_labels"] == 2
    assert not list((tmp_path / "hf").rglob("*.arrow"))  # no copy of the data left in the datasets cache
    # label ids instead of names (whole floats too), text read as written
    (tmp_path / "ids.csv").write_text("review,sentiment\n007,1\nNA,0.0\n12,1\n")
    tasks.register_config_tasks({"user_tasks": {"ids": {**REVIEWS, "files": {"train": "ids.csv"}}}})
    assert read_split("ids", "train", tmp_path) == [{"text_a": "007", "text_b": None, "label": 1},
                                                     {"text_a": "NA", "text_b": None, "label": 0},
                                                     {"text_a": "12", "text_b": None, "label": 1}]


@pytest.mark.parametrize("ext", [".tsv", ".jsonl", ".parquet"])
def test_every_local_format_reads_the_same_records(tmp_path, monkeypatch, registry, ext):
    monkeypatch.chdir(tmp_path)
    df = pd.DataFrame({"s1": ["a b", "c d", "e f"], "s2": ["x", "y", "z"], "score": [0.5, 4.0, 2.25]})
    path = tmp_path / f"pairs{ext}"
    {".tsv": lambda: df.to_csv(path, sep="\t", index=False), ".jsonl": lambda: df.to_json(path, orient="records",
     lines=True), ".parquet": lambda: df.to_parquet(path)}[ext]()
    tasks.register_config_tasks({"user_tasks": {"pairs": {"kind": "regression", "files": {"train": str(path)},
                                                          "text": ["s1", "s2"], "label": "score"}}})
    recs = read_split("pairs", "train", tmp_path)
    assert recs == [{"text_a": "a b", "text_b": "x", "label": 0.5}, {"text_a": "c d", "text_b": "y", "label": 4.0},
                    {"text_a": "e f", "text_b": "z", "label": 2.25}]
    assert tasks.task("pairs").metrics == ("pearson", "spearman")


def test_a_table_to_text_task_groups_references(tmp_path, monkeypatch, registry):
    monkeypatch.chdir(tmp_path)
    rows = [{"table": "name : A | food : x", "text": "A serves x."}, {"table": "name : B", "text": "B."},
            {"table": "name : A | food : x", "text": "At A, x is served."}, {"table": "name : C", "text": None}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks.register_config_tasks({"user_tasks": {"captions": {"kind": "table2text", "files": {"train": "t.jsonl"},
                                                             "text": ["table"], "label": "text"}}})
    assert read_split("captions", "train", tmp_path) == [
        {"source": "name : A | food : x", "references": ["A serves x.", "At A, x is served."]},
        {"source": "name : B", "references": ["B."]}]


def test_bad_input_is_an_error_naming_the_key_file_or_column(tmp_path, monkeypatch, registry):
    monkeypatch.chdir(tmp_path)
    write_reviews(tmp_path, 4)
    with pytest.raises(ValueError, match=r"user_tasks.sst2: 'sst2' is \(a spelling of\) one of the papers' tasks"):
        tasks.user_task("sst2", REVIEWS)
    with pytest.raises(ValueError, match=r"user_tasks.r.metrics: \['bleu'\] are not classification metrics"):
        tasks.user_task("r", {**REVIEWS, "metrics": ["bleu"]})
    with pytest.raises(ValueError, match="f1 and mcc are computed for two labels"):
        tasks.user_task("r", {**REVIEWS, "labels": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="give files .* or hub"):
        tasks.user_task("r", {k: v for k, v in REVIEWS.items() if k != "files"})
    tasks.register_config_tasks({"user_tasks": {
        "gone": {**REVIEWS, "files": {"train": "nowhere.csv"}},
        "wrongcol": {**REVIEWS, "label": "stars"},
        "badlabel": {**REVIEWS, "labels": ["neg", "pos"]}}})
    with pytest.raises(FileNotFoundError, match=r"user_tasks.gone.files.train: nowhere.csv does not exist"):
        read_split("gone", "train", tmp_path)
    with pytest.raises(ValueError, match=r"no split 'test'"):
        read_split("gone", "test", tmp_path)
    with pytest.raises(ValueError, match=r"no column \['stars'\].*\['review', 'sentiment'\]"):
        read_split("wrongcol", "train", tmp_path)
    with pytest.raises(MalformedDataError, match=r"reviews_train.csv: row 1: label 'negative' is not one of"):
        read_split("badlabel", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'nope'.*user_tasks"):
        tasks.task("nope")
    with pytest.raises(ValueError, match="a spelling of"):
        tasks.user_task("mnlimm", REVIEWS)  # an alias of MNLI would read MNLI
    with pytest.raises(ValueError, match="looked up as 'mydata'"):
        tasks.user_task("My_Data", REVIEWS)
    for body, problem in (("a,negative\nb,1\n", r"row 2: label '1' is not one of .*one or the other"),
                          ("a,negative\nb,\n", r"row 2: no label in column 'sentiment'"),
                          (",negative\n", r"row 1: empty 'review'")):
        (tmp_path / "bad.csv").write_text("review,sentiment\n" + body)
        tasks.register_config_tasks({"user_tasks": {"bad": {**REVIEWS, "files": {"train": "bad.csv"}}}})
        with pytest.raises(MalformedDataError, match=problem):
            read_split("bad", "train", tmp_path)
    (tmp_path / "nan.jsonl").write_text('{"s1": "a", "s2": "b", "score": NaN}\n')
    tasks.register_config_tasks({"user_tasks": {"nanscore": {"kind": "regression", "files": {"train": "nan.jsonl"},
                                                             "text": ["s1", "s2"], "label": "score"}}})
    with pytest.raises(MalformedDataError, match="row 1: no label"):
        read_split("nanscore", "train", tmp_path)


CONFIG = """
preset: user-task
threads: 1
models:
  tiny-bert: {source: tiny, arch: bert}
user_tasks:
  reviews:
    kind: classification
    files: {train: reviews_train.csv, dev: reviews_dev.csv}
    text: [review]
    label: sentiment
    labels: [negative, positive]
    metrics: [accuracy, f1]
datasets:
  reviews: {max_length: 16}
experiments:
  - name: li2022-reviews
    paper: li2022
    task: reviews
    models: [tiny-bert]
    methods: [full]
    epsilons: [8, inf]
    seeds: [0]
    train: {batch_size: 8, physical_batch_size: 8, steps: 2, lr: 1.0e-3}
  - name: xu2021-reviews
    paper: xu2021
    task: reviews
    models: [tiny-bert]
    methods: [vanilla, ct_f, ct_d]
    epsilons: [inf]
    seeds: [0]
    train: {batch_size: 8, physical_batch_size: 8, steps: 2, lr: 1.0e-3}
    child: {p_f: 0.3, p_d: 0.3, fisher_batch_size: 8}
"""


def test_the_tiny_stages_run_on_a_users_file(tmp_path, data_dir):
    """DP and non-private training, Child-Tuning (F and D, with its Fisher mask), evaluation, tables and
    the claims report, on a CSV of the user's, offline."""
    work = copy_workflow(tmp_path)
    write_reviews(work)
    (work / "config/user.yaml").write_text(CONFIG)
    env = {**os.environ, "PRIVTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PRIVTUNE_OFFLINE": "1"}
    targets = ["results/tables/li2022.csv", "results/tables/xu2021.csv", "results/claims.md"]
    out = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/user.yaml",
                          "--", *targets], cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    li = pd.read_csv(work / "results/tables/li2022.csv", dtype={"eps": str})
    assert "| reviews | tiny-bert |" in (work / "results/tables/li2022.md").read_text()  # the summary table
    assert set(li.task) == {"reviews"} and set(li.eps) == {"8", "inf"} and {"accuracy", "f1"} <= set(li.metric)
    assert li.ours.notna().all()
    xu = pd.read_csv(work / "results/tables/xu2021.csv")
    assert set(xu.method) >= {"vanilla", "ct_f", "ct_d"} and xu.ours.notna().all()
    assert (work / "results/data/reviews/train.jsonl").read_text().count("\n") == 40
    assert "reviews" not in (work / "results/claims.md").read_text()  # the papers' claims: the papers' tasks
    # the user's file is an input of the data rule: a change to it reruns what depends on it
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "config/user.yaml", "--", *targets],
                         cwd=work, capture_output=True, text=True, env=env)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    write_reviews(work, 36)
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "config/user.yaml", "--", *targets],
                         cwd=work, capture_output=True, text=True, env=env)
    assert "prepare_data" in dry.stdout + dry.stderr
    assert yaml.safe_load(CONFIG)["user_tasks"]["reviews"]["files"]["train"] in (dry.stdout + dry.stderr)
