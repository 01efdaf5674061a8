"""The task registry: every fact about a task, in one place, torch-free.

The readers (:mod:`privtune.data.readers`), the metrics, the prompt templates
(:mod:`privtune.objectives.templates`), the pipeline, the config schema's task names
(tests/test_tasks.py checks them), the tables and the figures all read :data:`TASKS`.

==========  ==============  =========================================  =======================
task        kind            metrics (the first is the main one)        full-data splits
==========  ==============  =========================================  =======================
sst2        classification  accuracy                                   train, dev, test
qnli        classification  accuracy                                   train, dev
mnli        classification  accuracy (and accuracy_mm, mismatched)     train, dev, dev_mismatched
qqp         classification  accuracy, f1                               train, dev
cola        classification  mcc, accuracy                              train, dev
rte         classification  accuracy                                   train, dev, test
mrpc        classification  accuracy, f1                               train, dev, test
stsb        regression      pearson, spearman                          train, dev, test
e2e         table2text      bleu, nist, meteor, rouge_l, cider         train, dev, test
dart        table2text      bleu, nist, meteor, rouge_l, cider, ter    train, dev, test
==========  ==============  =========================================  =======================

DART is scored with the E2E script's metrics and TER (sacreBLEU, lower is better:
:mod:`privtune.metrics.ter`), which DART's evaluation reports beside them.

A user's own dataset joins the registry from the config (``user_tasks:``, :func:`register_config_tasks`),
read through Hugging Face ``datasets`` (:mod:`privtune.data.user`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("classification", "regression", "table2text")


@dataclass(frozen=True)
class PromptSpec:
    """An LM-BFF template and one label word per label id (in the registry's label order).

    ``label_prefix`` is put before each label word when it is tokenized: a space
    selects the word-initial BPE token (LM-BFF's convention).
    """

    template: str
    label_words: tuple[str, ...]
    label_prefix: str = " "


@dataclass(frozen=True)
class CausalSpec:
    """A causal-LM template ending just before the label word, and one label word per label id."""

    template: str
    label_words: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str  # the config's name: sst2, ...
    display: str  # the tables' name: SST-2, ...
    kind: str  # classification | regression | table2text
    metrics: tuple[str, ...]  # what evaluation computes; metrics[0] is the main metric (figures, claims)
    files: dict[str, str]  # full-data split -> file under the data directory (the shared/data layout)
    labels: tuple[str, ...] = ()  # label names in label-id order (classification)
    glue_dir: str | None = None  # the GLUE / LM-BFF folder name (classification, regression)
    mismatched: bool = False  # a second (mismatched) evaluation set, reported as accuracy_mm
    mlm: PromptSpec | None = None  # masked-LM prompt (privtune.objectives.mlm)
    causal: CausalSpec | None = None  # causal-LM prompt (privtune.objectives.causal)
    descriptions: tuple[str, ...] | None = None  # sentence-encoder label descriptions (privtune.objectives.similarity)
    k_shot_files: dict[str, str] = field(default_factory=lambda: dict(K_SHOT_FILES))  # LM-BFF 16-shot split -> file
    source: dict | None = None  # a user's task (``user_tasks:`` in the config): its files or Hub id and columns

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        """Classes of a classifier; 1 for regression (one output); 0 for table-to-text."""
        return len(self.labels) if self.kind == "classification" else int(self.kind == "regression")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)


K_SHOT_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
GENERATION = ("bleu", "nist", "meteor", "rouge_l", "cider")

_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
_PARAPHRASE = "*cls**sent_0**mask*,*+sentl_1**sep+*"
_CAUSAL_NLI = "Premise: {a}\nHypothesis: {b}\nEntailment:"


def _glue(name: str, display: str, splits: tuple[str, ...], **kw) -> Task:
    files = {s: f"glue/{display}/{s}.tsv" for s in splits}
    return Task(name, display, kw.pop("kind", "classification"), kw.pop("metrics", ("accuracy",)),
                {**files, **kw.pop("files", {})}, glue_dir=display, **kw)


TASKS: dict[str, Task] = {t.name: t for t in [
    _glue("sst2", "SST-2", ("train", "dev", "test"), labels=("negative", "positive"),
          mlm=PromptSpec("*cls**sent_0*_It_was*mask*.*sep+*", ("terrible", "great")),
          causal=CausalSpec("Review: {a}\nSentiment:", (" negative", " positive")),
          descriptions=("It was terrible.", "It was great.")),
    _glue("qnli", "QNLI", ("train", "dev"), labels=("entailment", "not_entailment"),
          mlm=PromptSpec(_NLI, ("Yes", "No")),
          causal=CausalSpec("Question: {a}\nSentence: {b}\nAnswered:", (" yes", " no"))),
    _glue("mnli", "MNLI", ("train",), labels=("entailment", "neutral", "contradiction"), mismatched=True,
          files={"dev": "glue/MNLI/dev_matched.tsv", "dev_mismatched": "glue/MNLI/dev_mismatched.tsv"},
          k_shot_files={"train": "train.tsv", "dev": "dev_matched.tsv", "test": "test_matched.tsv",
                        "test_mismatched": "test_mismatched.tsv"},
          mlm=PromptSpec(_NLI, ("Yes", "Maybe", "No")), causal=CausalSpec(_CAUSAL_NLI, (" yes", " maybe", " no"))),
    _glue("qqp", "QQP", ("train", "dev"), labels=("not_duplicate", "duplicate"), metrics=("accuracy", "f1"),
          mlm=PromptSpec(_PARAPHRASE, ("No", "Yes")),
          causal=CausalSpec("Question 1: {a}\nQuestion 2: {b}\nSame question:", (" no", " yes"))),
    _glue("cola", "CoLA", (), labels=("unacceptable", "acceptable"), metrics=("mcc", "accuracy"),
          files={"train": "glue/CoLA/raw/in_domain_train.tsv", "dev": "glue/CoLA/raw/in_domain_dev.tsv"},
          mlm=PromptSpec("*cls**sent_0*_This_is*mask*.*sep+*", ("incorrect", "correct")),
          causal=CausalSpec("Sentence: {a}\nGrammatical:", (" no", " yes")),
          descriptions=("This sentence is ungrammatical.", "This sentence is grammatical.")),
    _glue("rte", "RTE", ("train", "dev", "test"), labels=("entailment", "not_entailment"),
          mlm=PromptSpec(_NLI, ("Yes", "No")), causal=CausalSpec(_CAUSAL_NLI, (" yes", " no"))),
    _glue("mrpc", "MRPC", ("train", "dev"), labels=("not_equivalent", "equivalent"), metrics=("accuracy", "f1"),
          files={"test": "glue/MRPC/raw/msr_paraphrase_test.txt"},
          mlm=PromptSpec(_PARAPHRASE, ("No", "Yes")),
          causal=CausalSpec("Sentence 1: {a}\nSentence 2: {b}\nSame meaning:", (" no", " yes"))),
    _glue("stsb", "STS-B", ("train", "dev", "test"), kind="regression", metrics=("pearson", "spearman")),
    Task("e2e", "E2E", "table2text", GENERATION,
         {"train": "e2e/trainset.csv", "dev": "e2e/devset.csv", "test": "e2e/testset_w_refs.csv"}, k_shot_files={}),
    Task("dart", "DART", "table2text", (*GENERATION, "ter"),
         {"train": "dart/dart-v1.1.1-full-train.json", "dev": "dart/dart-v1.1.1-full-dev.json",
          "test": "dart/dart-v1.1.1-full-test.xml"}, k_shot_files={}),
]}

_ALIASES = {"mnlim": "mnli", "mnlimm": "mnli", "mnlimatched": "mnli", "mnlimismatched": "mnli"}


def canonical(name: str, strict: bool = True) -> str:
    """The registry's name of ``name`` ("SST-2", "sst_2" and "sst2" are all ``sst2``); an unknown name is an
    error, or with ``strict=False`` comes back normalised (for lookups that have their own message)."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if strict and key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)} (a dataset of your own is "
                         "declared under user_tasks: in the config)")
    return key


def task(name: str) -> Task:
    """The registry entry of ``name`` (any spelling :func:`canonical` accepts)."""
    return TASKS[canonical(name)]


def names(kind: str | None = None) -> tuple[str, ...]:
    """The tasks of ``kind`` (all tasks when None), in registry order."""
    return tuple(t.name for t in TASKS.values() if kind is None or t.kind == kind)


def task_info(name: str) -> dict:
    """Kind, number of labels (1 for stsb, 0 for table2text), metrics and label names of a task."""
    t = task(name)
    return {"kind": t.kind, "num_labels": t.num_labels, "metrics": list(t.metrics),
            "label_names": list(t.labels) if t.kind == "classification" else None}


BUILTIN = frozenset(TASKS)  # the papers' tasks; a user task may not take one of their names
USER_METRICS = {"classification": ("accuracy", "f1", "mcc"), "regression": ("pearson", "spearman"),
                "table2text": (*GENERATION, "ter")}
DEFAULT_USER_METRICS = {"classification": ("accuracy",), "regression": ("pearson", "spearman"), "table2text": GENERATION}


def user_task(name: str, spec: dict) -> Task:
    """A registry entry for a user's dataset described by ``spec`` (one ``user_tasks:`` entry of the config;
    the schema documents its keys); an inconsistent entry is an error naming the key."""
    where = f"user_tasks.{name}"
    if name in BUILTIN or canonical(name, strict=False) in BUILTIN:
        raise ValueError(f"{where}: {name!r} is (a spelling of) one of the papers' tasks; give your dataset "
                         "another name")
    if canonical(name, strict=False) != name:
        raise ValueError(f"{where}: a task name is lowercase letters and digits (it would be looked up as "
                         f"{canonical(name, strict=False)!r})")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}.kind must be one of {KINDS}, got {kind!r}")
    if not spec.get("files") and not spec.get("hub"):
        raise ValueError(f"{where}: give files (split -> a CSV/TSV/JSON/JSONL/Parquet file) or hub (a dataset id)")
    if spec.get("files") and spec.get("hub"):
        raise ValueError(f"{where}: give files or hub, not both")
    metrics = tuple(spec.get("metrics") or DEFAULT_USER_METRICS[kind])
    unknown = [m for m in metrics if m not in USER_METRICS[kind]]
    if unknown:
        raise ValueError(f"{where}.metrics: {unknown} are not {kind} metrics; choose from {USER_METRICS[kind]}")
    labels = tuple(str(x) for x in spec.get("labels") or ())
    if kind == "classification" and len(labels) < 2:
        raise ValueError(f"{where}.labels: a classification task needs its label names in label-id order "
                         "(at least two)")
    if kind == "classification" and len(labels) != 2 and {"f1", "mcc"} & set(metrics):
        raise ValueError(f"{where}.metrics: f1 and mcc are computed for two labels; {name} has {len(labels)}")
    text = spec.get("text")
    if not text or (kind == "table2text" and len(text) != 1) or len(text) > 2:
        raise ValueError(f"{where}.text: one or two text columns (table-to-text: one, the table's linearisation)")
    if not spec.get("label"):
        raise ValueError(f"{where}.label: the label column (table-to-text: the reference text column)")
    splits = spec.get("files") or spec["hub"].get("splits") or {}
    if "train" not in splits:
        raise ValueError(f"{where}: no train split among {sorted(splits)} (files or hub.splits need train)")
    return Task(name, name, kind, metrics, files=dict(spec.get("files") or {}),
                labels=labels if kind == "classification" else (), k_shot_files={}, source=dict(spec))


def register_config_tasks(config: dict) -> list[str]:
    """Add the config's ``user_tasks`` to :data:`TASKS` (every process that reads the config calls this:
    the workflow, each rule's script); returns their names."""
    added = []
    for name, spec in (config.get("user_tasks") or {}).items():
        TASKS[name] = user_task(name, spec)
        added.append(name)
    return added
