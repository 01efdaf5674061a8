"""The task registry (privtune.tasks) is the one place task facts live: everything else agrees with it."""
from pathlib import Path

import pytest
import yaml

from privtune import tasks
from privtune.data import readers
from privtune.objectives import templates

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


def test_the_schema_names_exactly_the_registry_tasks():
    import re

    props = SCHEMA["properties"]
    experiment = props["experiments"]["items"]["properties"]
    builtin = sorted(tasks.BUILTIN)
    for where in (props["datasets"], experiment["task"]):  # the papers' tasks, named, and user_tasks' names
        text = where["description"]
        assert sorted(re.findall(r"\b(" + "|".join(builtin) + r")\b", text)) == builtin
    assert all(re.fullmatch(experiment["task"]["pattern"], t) for t in tasks.TASKS)
    assert props["user_tasks"]["propertyNames"]["pattern"] == experiment["task"]["pattern"]
    metric_enum = props["user_tasks"]["additionalProperties"]["properties"]["metrics"]["items"]["enum"]
    assert sorted(metric_enum) == sorted({m for ms in tasks.USER_METRICS.values() for m in ms})
    public = experiment["child"]["properties"]["public_data"]["properties"]["task"]["enum"]
    assert public == [t for t in tasks.TASKS if tasks.TASKS[t].kind != "table2text"]
    generation = [m for t in tasks.TASKS.values() if t.kind == "table2text" for m in t.metrics]
    assert experiment["eval_metrics"]["items"]["enum"] == list(dict.fromkeys(generation))  # every task's, once


@pytest.mark.parametrize("name", [t for t in tasks.TASKS if tasks.TASKS[t].kind != "table2text"])
def test_classification_metrics_compute_what_the_registry_lists(name):
    from privtune.metrics import classification_metrics

    t = tasks.task(name)
    labels = [0.0, 1.5, 3.0, 4.5] if t.kind == "regression" else [0, 1, 1, 0]
    preds = [0.5, 1.0, 3.5, 4.0] if t.kind == "regression" else [0, 1, 0, 0]
    assert tuple(classification_metrics(name, preds, labels)) == t.metrics
    assert t.main_metric == t.metrics[0]


def test_generation_metric_names_are_the_registry_ones():
    from privtune.metrics import GENERATION_METRICS

    assert tasks.GENERATION == tasks.task("e2e").metrics  # the E2E script's five
    assert tasks.task("dart").metrics == (*tasks.GENERATION, "ter")  # DART's table adds TER
    assert GENERATION_METRICS == tasks.task("dart").metrics  # what the metric stage computes: every task's


def test_cola_is_scored_by_mcc_everywhere():
    from privtune.report.figures import main_metric

    assert readers.task_info("cola")["metrics"][0] == "mcc" == main_metric("cola") == tasks.task("CoLA").main_metric


def test_spellings_resolve_to_one_name_and_unknown_names_are_refused():
    assert {tasks.canonical(s) for s in ("SST-2", "sst_2", " sst2 ")} == {"sst2"}
    assert tasks.canonical("mnli-mm") == "mnli" and tasks.canonical("STS-B") == "stsb"
    with pytest.raises(ValueError, match="unknown task 'sst5'.*known tasks"):
        tasks.task("sst5")


def test_each_prompt_has_one_label_word_or_description_per_label():
    for t in tasks.TASKS.values():
        for spec in (t.mlm, t.causal):
            if spec is not None:
                assert len(spec.label_words) == t.num_labels, t.name
        if t.descriptions is not None:
            assert len(t.descriptions) == t.num_labels, t.name
    assert templates.TEMPLATES["sst2"] is tasks.task("sst2").mlm


def test_reader_files_and_split_names_come_from_the_registry():
    known = {f for t in tasks.TASKS.values() for f in t.files.values()}
    assert set(readers.OFFICIAL_RECORDS) <= known
    assert tasks.task("mnli").splits == ("train", "dev", "dev_mismatched")
    assert readers.CLASSIFICATION_TASKS | readers.TABLE2TEXT_TASKS == set(tasks.TASKS)
    with pytest.raises(ValueError, match="valid splits: \\['dev', 'train'\\]"):
        readers.read_split("qnli", "test", ROOT)


def test_mismatched_evaluation_follows_the_registry():
    from privtune.pipeline import extra_eval_files

    assert [t for t in tasks.TASKS if extra_eval_files(t)] == [t for t in tasks.TASKS if tasks.TASKS[t].mismatched]
    assert [t for t in tasks.TASKS if tasks.TASKS[t].mismatched] == ["mnli"]


def test_the_tables_name_tasks_as_the_registry_does():
    from privtune.report.tables import task_name

    assert all(task_name(t.name) == t.display for t in tasks.TASKS.values())
