"""The papers' data files read through Hugging Face ``datasets``' packaged builders (``csv``, ``json``,
``text``), from the mirror layout or as downloaded from their official sources into it; a user's own files
go through the same builders in :mod:`privtune.data.user`.

Each load converts in a temporary cache that is deleted when the rows have been read, so that no copy of a
(possibly private) training set is left in the Hugging Face cache and a changed file is never answered
from a stale one. Text tables are read with every cell as text (``007`` stays ``007``, ``NA`` stays
``NA``). A row with more or fewer fields than the header is an error naming the file and line.
"""
from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from privtune.data.download import MalformedDataError


@contextmanager
def quiet_progress() -> Iterator[None]:
    """datasets' per-file progress bars off (a rule's log keeps the pipeline's own), and back as they were."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            enable_progress_bars()


def _cause(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``err``'s chain (datasets wraps the parser's own error)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@dataclass(frozen=True)
class Table:
    """The columns of a text table (every cell a string) and where each row starts in its file."""

    columns: dict[str, list[str]]
    line_of: Callable[[int], int]  # 0-based row -> 1-based line of the file

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


def header(path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL) -> list[str]:
    """The first row of a text table (a leading BOM ignored); [] for an empty file."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f, delimiter=delimiter, quoting=quoting), [])


def _row_starts(path: Path, delimiter: str, quoting: int, n_fields: int, skip: int) -> list[int]:
    """The 1-based line on which each non-blank row after the first ``skip`` starts (a quoted field may span
    lines), after checking that each has ``n_fields`` fields: pandas, under the csv builder, fills a short
    row with empty cells, so a truncated or shifted row would pass unseen."""
    what = {"\t": "tab-separated", ",": "comma-separated"}.get(delimiter, f"{delimiter!r}-separated")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader, starts, line = csv.reader(f, delimiter=delimiter, quoting=quoting), [], 1
        try:
            for fields in reader:
                if fields:
                    if len(starts) >= skip and len(fields) != n_fields:
                        raise MalformedDataError(path, f"expected {n_fields} {what} fields, got {len(fields)}", line)
                    starts.append(line)
                line = reader.line_num + 1
        except csv.Error as err:
            raise MalformedDataError(path, f"cannot parse row: {err}", reader.line_num) from err
    return starts[skip:]


def read_table(path: Path, *, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL,
               names: list[str] | None = None) -> Table:
    """A CSV/TSV file through ``load_dataset("csv")``: the header row names the columns unless ``names`` (a
    headerless file) is given. Every cell is text; blank lines are skipped."""
    from datasets import Features, Value, load_dataset
    from pandas.errors import ParserError

    columns = list(names) if names is not None else [c.strip() for c in header(path, delimiter, quoting)]
    if not columns:
        return Table({}, lambda i: i + 1)
    if len(set(columns)) != len(columns):
        raise MalformedDataError(path, f"repeated column names in the header {columns}", 1)
    skip = 0 if names is not None else 1
    starts = _row_starts(path, delimiter, quoting, len(columns), skip)
    try:
        with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache, quiet_progress():
            ds = load_dataset("csv", data_files={"rows": str(Path(path).resolve())}, split="rows", cache_dir=cache,
                              sep=delimiter, quoting=quoting, keep_default_na=False, encoding="utf-8-sig",
                              features=Features({c: Value("string") for c in columns}),
                              names=columns, header=None, skiprows=skip)
            cols = ds.to_dict()
    except Exception as err:
        if isinstance(err, ValueError) and "corresponds to no data" in str(err):
            return Table({c: [] for c in columns}, starts.__getitem__)  # no rows: the caller decides
        parser = _cause(err, ParserError)
        if parser is not None:
            raise MalformedDataError(path, f"cannot parse the file ({str(parser).strip()})") from None
        raise
    cols = {c: ["" if v is None else v for v in cols[c]] for c in columns}
    if (n_rows := len(cols[columns[0]])) != len(starts):
        raise MalformedDataError(path, f"pandas read {n_rows} rows where the csv module reads {len(starts)}: "
                                       "the quoting is ambiguous; check the file")
    return Table(cols, starts.__getitem__)


def read_json_records(path: Path) -> list:
    """A JSON array (or JSON lines) of objects through ``load_dataset("json")``; invalid JSON is an error
    naming the line where the parser stopped."""
    from datasets import load_dataset

    try:
        with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache, quiet_progress():
            return load_dataset("json", data_files={"rows": str(Path(path).resolve())}, split="rows",
                                cache_dir=cache).to_list()
    except Exception:
        try:  # name the line: the standard parser says where it stopped
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as err:
            raise MalformedDataError(path, f"invalid JSON ({err.msg}; truncated?)", err.lineno) from None
        raise


def read_document(path: Path) -> str:
    """A whole file's text (an XML file, say) through ``load_dataset("text", sample_by="document")``. (The
    ``xml`` builder of datasets 5.2.0 cannot open a local file: it passes the file iterator as a path.)"""
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache, quiet_progress():
        rows = load_dataset("text", data_files={"rows": str(Path(path).resolve())}, split="rows",
                            cache_dir=cache, sample_by="document", keep_linebreaks=True)["text"]
    return rows[0] if rows else ""
