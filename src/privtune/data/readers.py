"""Readers for the GLUE classification/regression tasks and the E2E / DART table-to-text tasks.

``read_split(task, split, data_dir, k_shot_seed=None)`` returns a list of records:

* classification / regression: ``{"text_a": str, "text_b": str | None, "label": int | float | None}``;
* table-to-text: ``{"source": str, "references": [str, ...]}``, one record per input.

Paths are relative to ``data_dir`` in the layout of the ``shared/data`` mirror; every file
is located through :func:`privtune.data.download.ensure_file` (download from its official source, or a
clear error) and read through Hugging Face ``datasets``' packaged builders (:mod:`privtune.data.hf`): the
same code path with or without internet.

File layouts (tsv = tab-separated, UTF-8, a leading BOM is ignored):

* ``glue/SST-2/{train,dev}.tsv``: header ``sentence label`` (0 negative, 1 positive);
  ``test.tsv``: ``index sentence`` (no label).
* ``glue/CoLA/raw/in_domain_{train,dev}.tsv``: no header; ``source label orig-label sentence``
  (1 acceptable). Same layout as GLUE ``CoLA/{train,dev}.tsv`` and the LM-BFF CoLA files.
* ``glue/RTE/{train,dev,test}.tsv``: Hugging Face ``datasets`` export, header
  ``sentence1 sentence2 label idx``, label 0 entailment / 1 not_entailment / -1 (test) unlabelled,
  and CSV-style quoting (fields with quotes are wrapped in ``"..."``). The GLUE layout
  ``index sentence1 sentence2 label`` with string labels (GLUE zip, LM-BFF) is read as well.
* ``glue/STS-B/{train,dev,test}.tsv``: GLUE, columns by header name ``sentence1 sentence2 score``
  (score in [0, 5]; absent in test).
* ``glue/MRPC/{train,dev}.tsv`` and ``glue/MRPC/raw/msr_paraphrase_test.txt`` (test, labelled):
  header ``Quality #1 ID #2 ID #1 String #2 String`` (Quality 1 = paraphrase).
* ``glue/QNLI/{train,dev}.tsv``: header ``index question sentence label``,
  label ``entailment`` (0) / ``not_entailment`` (1).
* ``glue/MNLI/{train,dev_matched,dev_mismatched}.tsv``: GLUE, ``sentence1 sentence2 ... gold_label``;
  labels entailment 0, neutral 1, contradiction 2 (GLUE / HF order).
* ``glue/QQP/{train,dev}.tsv``: GLUE, ``id qid1 qid2 question1 question2 is_duplicate`` (1 duplicate).
* ``lmbff_k_shot/{TASK}/16-{seed}/``: LM-BFF 16-shot splits in the same layouts (GLUE layout for
  RTE); ``train.tsv``, ``dev.tsv`` and ``test.tsv`` (= the full GLUE dev set); for MNLI
  ``dev_matched.tsv``, ``test_matched.tsv``, ``test_mismatched.tsv``.
* ``e2e/{trainset,devset,testset_w_refs}.csv``: CSV with header ``mr,ref``; rows sharing an MR are
  grouped into one record. The MR ``name[Alimentum], familyFriendly[no]`` is linearised as in the
  prefix-tuning (Li & Liang) data: ``name : Alimentum | family friendly : no``.
* ``dart/dart-v1.1.1-full-{train,dev}.json``: list of ``{"tripleset": [[s, p, o], ...],
  "annotations": [{"text": ...}, ...]}``; ``dart/dart-v1.1.1-full-test.xml``: WebNLG-style
  ``<entry>`` elements with ``<mtriple>s | p | o</mtriple>`` and ``<lex>`` references.
  One record per entry, triples linearised as ``s : p : o`` joined by `` | `` with the
  predicate lower-cased (as Li & Liang / private-transformers do).

Test splits without labels give ``label None``. Rows with a wrong number of fields or an
unparsable label raise :class:`MalformedDataError` (file, 1-based line, problem).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtune.data.download import DataFileError, MalformedDataError, data_file_error, ensure_file
from privtune.data.hf import read_table
from privtune.data.table2text import linearize_dart_triples, linearize_e2e_mr, read_dart, read_e2e_csv
from privtune.tasks import canonical, names, task_info  # noqa: F401 (task_info re-exported)
from privtune.tasks import task as _task

__all__ = [
    "CLASSIFICATION_TASKS",
    "TABLE2TEXT_TASKS",
    "DataFileError",
    "MalformedDataError",
    "K_SHOT",
    "OFFICIAL_RECORDS",
    "linearize_dart_triples",
    "linearize_e2e_mr",
    "read_split",
    "task_info",
]


# task names by reader: GLUE tsv (classification and regression) or table-to-text (privtune.tasks has the rest)
CLASSIFICATION_TASKS = frozenset(names("classification") + names("regression"))
TABLE2TEXT_TASKS = frozenset(names("table2text"))
K_SHOT = 16  # examples per class in the LM-BFF splits


# --------------------------------------------------------------------------- file tables

# Records (reader units: rows, E2E meaning representations, DART entries) of each official
# file: counted here on the offline mirror, or (QNLI/MNLI/QQP train and dev) GLUE's published
# sizes. A mismatch means a truncated or different file.
OFFICIAL_RECORDS: dict[str, int] = {
    "glue/SST-2/train.tsv": 67_349, "glue/SST-2/dev.tsv": 872, "glue/SST-2/test.tsv": 1_821,
    "glue/CoLA/raw/in_domain_train.tsv": 8_551, "glue/CoLA/raw/in_domain_dev.tsv": 527,
    "glue/RTE/train.tsv": 2_490, "glue/RTE/dev.tsv": 277, "glue/RTE/test.tsv": 3_000,
    "glue/STS-B/train.tsv": 5_749, "glue/STS-B/dev.tsv": 1_500, "glue/STS-B/test.tsv": 1_379,
    "glue/MRPC/train.tsv": 3_668, "glue/MRPC/dev.tsv": 408, "glue/MRPC/raw/msr_paraphrase_test.txt": 1_725,
    "glue/QNLI/train.tsv": 104_743, "glue/QNLI/dev.tsv": 5_463,
    "glue/MNLI/train.tsv": 392_702, "glue/MNLI/dev_matched.tsv": 9_815, "glue/MNLI/dev_mismatched.tsv": 9_832,
    "glue/QQP/train.tsv": 363_846, "glue/QQP/dev.tsv": 40_430,
    "e2e/devset.csv": 547, "e2e/testset_w_refs.csv": 630,
    "dart/dart-v1.1.1-full-dev.json": 2_768, "dart/dart-v1.1.1-full-test.xml": 5_097,
}

def _pick(files: dict[str, str], task: str, split: str, mode: str) -> str:
    if split not in files:
        raise ValueError(f"task {task!r} has no split {split!r} ({mode}); valid splits: {sorted(files)}")
    return files[split]


def _classification_relpath(task: str, split: str, k_shot_seed: int | None) -> str:
    if k_shot_seed is None:
        return _pick(_task(task).files, task, split, "full data")
    name = _pick(_task(task).k_shot_files, task, split, f"{K_SHOT}-shot")
    return f"lmbff_k_shot/{_task(task).glue_dir}/{K_SHOT}-{int(k_shot_seed)}/{name}"


# --------------------------------------------------------------------------- entry point


def read_split(
    task: str, split: str, data_dir: str | Path, k_shot_seed: int | None = None, verify_size: bool = True
) -> list[dict[str, Any]]:
    """Read one split of ``task`` from ``data_dir`` (see the module docstring for layouts).

    ``split`` is "train", "dev" or "test" ("dev_mismatched" for full MNLI; with
    ``k_shot_seed``, MNLI has "test_mismatched"). With ``k_shot_seed`` (e.g. 42) the
    LM-BFF 16-shot split of that seed is read instead of the full GLUE split.
    With ``verify_size``, an official file whose record count differs from
    :data:`OFFICIAL_RECORDS` (truncated, or another version) is an error.
    """
    task = canonical(task)
    data_dir = Path(data_dir)
    if _task(task).source is not None:  # a user's own dataset (user_tasks:), through Hugging Face datasets
        if k_shot_seed is not None:
            raise ValueError(f"k_shot_seed is only defined for the GLUE tasks, not the user task {task!r}")
        from privtune.data.user import read_user_split

        return read_user_split(_task(task), split)
    if task in TABLE2TEXT_TASKS:
        if k_shot_seed is not None:
            raise ValueError(f"k_shot_seed is only defined for classification tasks, not {task!r}")
        parse = read_e2e_csv if task == "e2e" else read_dart
        return _load(_pick(_task(task).files, task, split, "full data"), data_dir, parse, task if verify_size else None)
    relpath = _classification_relpath(task, split, k_shot_seed)
    return _load(relpath, data_dir, lambda path: _read_glue_tsv(path, task, unlabelled_ok=split.startswith("test")),
                 task if verify_size else None)


def _load(relpath: str, data_dir: Path, parse: Callable[[Path], list[dict[str, Any]]],
          verify_task: str | None = None) -> list[dict[str, Any]]:
    """Ensure ``relpath`` exists, parse it, and treat a file without records, or (when
    ``verify_task`` names the task) with another count than the official file, as truncated."""
    path = ensure_file(relpath, data_dir)
    records = parse(path)
    if not records:
        raise data_file_error(relpath, data_dir, "contains no records (empty or truncated)")
    expected = OFFICIAL_RECORDS.get(relpath)
    if verify_task and expected is not None and len(records) != expected:
        raise data_file_error(
            relpath, data_dir,
            f"holds {len(records):,} records where the official file holds {expected:,}: it is truncated or "
            f"not the official version. Delete it so that it is fetched again, or, for a file you changed on "
            f"purpose, set datasets.{verify_task}.verify_size: false in the config")
    return records


# --------------------------------------------------------------------------- GLUE tsv


@dataclass(frozen=True)
class _Columns:
    """Where text_a / text_b / label live: header names, or indices for headerless files."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    n_fields: int | None = None  # set only for headerless layouts


_COLUMNS = {
    "sst2": _Columns("sentence", None, "label"),
    "cola": _Columns(3, None, 1, n_fields=4),
    "rte": _Columns("sentence1", "sentence2", "label"),
    "stsb": _Columns("sentence1", "sentence2", "score"),
    "mrpc": _Columns("#1 String", "#2 String", "Quality"),
    "qnli": _Columns("question", "sentence", "label"),
    "mnli": _Columns("sentence1", "sentence2", "gold_label"),
    "qqp": _Columns("question1", "question2", "is_duplicate"),
}

_UNLABELLED = "-1"  # HF datasets exports mark unlabelled (test) rows with -1


def _named_label_parser(names: Sequence[str]) -> Callable[[str], int]:
    """Parse a label given either by name (``entailment``) or by index (``0``)."""
    lookup = {name: i for i, name in enumerate(names)} | {str(i): i for i in range(len(names))}

    def parse(raw: str) -> int:
        try:
            return lookup[raw.strip()]
        except KeyError:
            raise ValueError(f"expected one of {sorted(lookup)}") from None

    return parse


def _parse_score(raw: str) -> float:
    """STS-B similarity score: a float in [0, 5]."""
    value = float(raw)
    if not (math.isfinite(value) and 0.0 <= value <= 5.0):
        raise ValueError("expected a score in [0, 5]")
    return value


def _label_parser(task: str) -> Callable[[str], int | float]:
    return _parse_score if task == "stsb" else _named_label_parser(_task(task).labels)


def _tsv_quoting(path: Path) -> int:
    """QUOTE_NONE for GLUE files (quotes are text); CSV quoting for HF exports (last column ``idx``)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    return csv.QUOTE_MINIMAL if header[-1] == "idx" else csv.QUOTE_NONE


def _header_names(
    path: Path, names: list[str], cols: _Columns, unlabelled_ok: bool
) -> tuple[str, str | None, str | None]:
    """The columns of text_a, text_b, label in ``names`` (label None if absent and allowed)."""

    def column(name: str | int) -> str:
        if name not in names:
            raise MalformedDataError(path, f"header {names} lacks column {name!r}", 1)
        return str(name)

    text_b = None if cols.text_b is None else column(cols.text_b)
    label = None if (unlabelled_ok and cols.label not in names) else column(cols.label)
    return column(cols.text_a), text_b, label


def _read_glue_tsv(path: Path, task: str, unlabelled_ok: bool) -> list[dict[str, Any]]:
    """Read a GLUE-style tsv of ``task`` through ``datasets``; labels may be missing/-1 only when
    ``unlabelled_ok``."""
    cols = _COLUMNS[task]
    if cols.n_fields is None:
        table = read_table(path, delimiter="\t", quoting=_tsv_quoting(path))
        if not table.columns:
            return []
        a, b, lab = _header_names(path, list(table.columns), cols, unlabelled_ok)
    else:
        names = [f"field{i}" for i in range(cols.n_fields)]
        table = read_table(path, delimiter="\t", quoting=_tsv_quoting(path), names=names)
        a, b, lab = names[int(cols.text_a)], None, names[int(cols.label)]
    parse_label = _label_parser(task)
    text_a, text_b = table.columns[a], table.columns[b] if b is not None else None
    raw = table.columns[lab] if lab is not None else None
    records = []
    for i in range(len(table)):
        label: int | float | None = None
        if raw is not None and not (unlabelled_ok and raw[i].strip() == _UNLABELLED):
            try:
                label = parse_label(raw[i])
            except ValueError as err:
                raise MalformedDataError(path, f"unparsable label {raw[i]!r} ({err})", table.line_of(i)) from None
        records.append({"text_a": text_a[i], "text_b": text_b[i] if text_b is not None else None, "label": label})
    return records
