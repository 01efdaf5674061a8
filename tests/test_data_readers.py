"""Tests for privtune.data.readers / privtune.data.download against the shared/data mirror.

The data dir is $PRIVTUNE_DATA_DIR, else <repo>/../shared/data; tests needing it are
skipped when it is absent. No test touches the network: the downloader is patched out
(an autouse fixture), and the real one is only exercised against file:// URLs and a
refused 127.0.0.1 port.
"""

from __future__ import annotations

import os
import socket
import zipfile
from pathlib import Path

import pytest

from privtune.data import download, readers, table2text
from privtune.data.download import DataFileError, ensure_file
from privtune.data.readers import (
    CLASSIFICATION_TASKS,
    TABLE2TEXT_TASKS,
    OFFICIAL_RECORDS,
    MalformedDataError,
    linearize_e2e_mr,
    read_split,
    task_info,
)

DATA_DIR = Path(
    os.environ.get("PRIVTUNE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
_REAL_DOWNLOAD = download._download


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every download attempt fail without touching the network."""

    def refuse(source: str, dest: Path, data_dir: str | Path) -> None:
        raise OSError(f"network disabled in tests (would fetch {source})")

    monkeypatch.setattr(download, "_download", refuse)
    monkeypatch.delenv("PRIVTUNE_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"data dir {DATA_DIR} absent (set PRIVTUNE_DATA_DIR)")
    return DATA_DIR


# --------------------------------------------------------------------------- task_info


def test_task_info() -> None:
    assert task_info("sst2") == {
        "kind": "classification",
        "num_labels": 2,
        "metrics": ["accuracy"],
        "label_names": ["negative", "positive"],
    }
    assert task_info("mnli")["label_names"] == ["entailment", "neutral", "contradiction"]
    assert task_info("stsb")["kind"] == "regression" and task_info("stsb")["num_labels"] == 1
    assert task_info("e2e")["kind"] == "table2text" and task_info("dart")["label_names"] is None
    kinds = {t: task_info(t)["kind"] for t in CLASSIFICATION_TASKS}
    assert {t for t, kind in kinds.items() if kind == "classification"} == CLASSIFICATION_TASKS - {"stsb"}
    assert TABLE2TEXT_TASKS == {"e2e", "dart"}
    with pytest.raises(ValueError, match="unknown task"):
        task_info("wnli")


# --------------------------------------------------------------------------- GLUE counts and labels


@pytest.mark.parametrize(
    ("task", "split", "count"),
    [
        ("sst2", "train", 67_349),
        ("sst2", "dev", 872),
        ("sst2", "test", 1_821),
        ("cola", "train", 8_551),
        ("cola", "dev", 527),
        ("rte", "train", 2_490),
        ("rte", "dev", 277),
        ("rte", "test", 3_000),
        ("stsb", "train", 5_749),
        ("stsb", "dev", 1_500),
        ("stsb", "test", 1_379),
        ("mrpc", "train", 3_668),
        ("mrpc", "dev", 408),
        ("mrpc", "test", 1_725),
        ("qnli", "dev", 5_463),
    ],
)
def test_glue_counts_and_labels(data_dir: Path, task: str, split: str, count: int) -> None:
    records = read_split(task, split, data_dir)
    assert len(records) == count
    assert all(isinstance(r["text_a"], str) and r["text_a"] for r in records)
    paired = task not in ("sst2", "cola")
    assert all((r["text_b"] is not None) == paired for r in records)
    labels = [r["label"] for r in records]
    if split == "test" and task != "mrpc":
        assert set(labels) == {None}
    elif task == "stsb":
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels)
    else:
        assert set(labels) == {0, 1}


def test_glue_first_records(data_dir: Path) -> None:
    assert read_split("sst2", "train", data_dir)[0] == {
        "text_a": "hide new secretions from the parental units ",
        "text_b": None,
        "label": 0,
    }
    assert read_split("cola", "train", data_dir)[0] == {
        "text_a": "Our friends won't buy this analysis, let alone the next one we propose.",
        "text_b": None,
        "label": 1,
    }
    rte = read_split("rte", "train", data_dir)[0]
    assert rte == {
        "text_a": "No Weapons of Mass Destruction Found in Iraq Yet.",
        "text_b": "Weapons of Mass Destruction Found in Iraq.",
        "label": 1,  # not_entailment
    }
    stsb = read_split("stsb", "train", data_dir)[:2]
    assert [(r["text_a"], r["label"]) for r in stsb] == [
        ("A plane is taking off.", 5.0),
        ("A man is playing a large flute.", 3.8),
    ]
    mrpc = read_split("mrpc", "dev", data_dir)[0]  # dev.tsv starts with a UTF-8 BOM
    assert mrpc["label"] == 1 and mrpc["text_b"].startswith('" The foodservice pie business')
    qnli = read_split("qnli", "dev", data_dir)[:2]
    assert qnli[0]["text_a"] == "What came into force after the new constitution was herald?"
    assert [r["label"] for r in qnli] == [0, 1]  # entailment, not_entailment


def test_quote_characters_kept_verbatim(data_dir: Path) -> None:
    """GLUE files are read with QUOTE_NONE; the HF-export RTE files use CSV quoting."""
    mrpc = read_split("mrpc", "train", data_dir)[0]
    assert mrpc["text_a"].startswith('Amrozi accused his brother, whom he called "the witness"')
    rte = read_split("rte", "dev", data_dir)
    assert not any(r["text_a"].startswith('"') and r["text_a"].endswith('"') for r in rte)
    assert any('"If someone snaps' in r["text_a"] for r in rte)


# --------------------------------------------------------------------------- k-shot


def test_k_shot_mnli_qqp(data_dir: Path) -> None:
    mnli = read_split("mnli", "train", data_dir, k_shot_seed=42)
    assert len(mnli) == 48 and sorted(r["label"] for r in mnli) == [0] * 16 + [1] * 16 + [2] * 16
    assert mnli[0] == {"text_a": "That's all right.", "text_b": "That's fine.", "label": 0}
    assert len(read_split("mnli", "dev", data_dir, k_shot_seed=13)) == 48
    qqp = read_split("qqp", "dev", data_dir, k_shot_seed=42)
    assert len(qqp) == 32 and sorted(r["label"] for r in qqp) == [0] * 16 + [1] * 16
    assert qqp[0]["text_a"] == "Have you heard about the Delta Charting Group out of Tucson, Arizona?"


def test_k_shot_test_is_full_dev(data_dir: Path) -> None:
    """LM-BFF test.tsv = full GLUE dev; RTE there is in GLUE layout with string labels."""
    for task in ("rte", "mrpc", "qnli", "stsb"):
        assert read_split(task, "test", data_dir, k_shot_seed=42) == read_split(task, "dev", data_dir), task
    # LM-BFF's SST-2 text differs in tokenisation ("(clara and paul)" vs "( clara and paul )").
    sst2_k, sst2_dev = read_split("sst2", "test", data_dir, k_shot_seed=42), read_split("sst2", "dev", data_dir)
    assert len(sst2_k) == len(sst2_dev) == 872
    assert sum(r["label"] for r in sst2_k) == sum(r["label"] for r in sst2_dev)
    assert len(read_split("cola", "test", data_dir, k_shot_seed=42)) == 1_043  # in-domain + out-of-domain dev


def test_full_mnli_qqp_missing(data_dir: Path) -> None:
    with pytest.raises(DataFileError, match="glue/MNLI/train.tsv") as info:
        read_split("mnli", "train", data_dir)
    assert "MNLI.zip" in str(info.value) and "PRIVTUNE_DATA_DIR" in str(info.value)
    with pytest.raises(DataFileError, match="glue/QQP/dev.tsv"):
        read_split("qqp", "dev", data_dir)
    with pytest.raises(ValueError, match="valid splits"):
        read_split("mnli", "test_mismatched", data_dir)


# --------------------------------------------------------------------------- E2E


def test_e2e_counts_and_first_record(data_dir: Path) -> None:
    dev, test = read_split("e2e", "dev", data_dir), read_split("e2e", "test", data_dir)
    assert (len(dev), len(test)) == (547, 630)
    assert sum(len(r["references"]) for r in dev) == 4_672
    assert sum(len(r["references"]) for r in test) == 4_693
    assert dev[0]["source"] == "name : Alimentum | area : city centre | family friendly : no"
    assert dev[0]["references"][0] == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert len(dev[0]["references"]) == 6
    assert test[0]["source"] == "name : Blue Spice | Type : coffee shop | area : city centre"


@pytest.mark.parametrize(("split", "txt"), [("dev", "valid.txt"), ("test", "test.txt")])
def test_e2e_linearisation_matches_prefix_tuning(data_dir: Path, split: str, txt: str) -> None:
    """Every prefix-tuning line `source||target` matches our source for that row's MR."""
    lines = (data_dir / "e2e" / "prefix_tuning_format" / txt).read_text(encoding="utf-8").splitlines()
    expected = [line.split("||")[0] for line in lines]
    ours = [r["source"] for r in read_split("e2e", split, data_dir) for _ in r["references"]]
    assert ours[:6] == expected[:6]
    assert ours == expected


def test_e2e_mr_linearisation_unit() -> None:
    assert (
        linearize_e2e_mr("name[Cocum], eatType[coffee shop], priceRange[£20-25], customer rating[high]")
        == "name : Cocum | Type : coffee shop | price : £ 20 - 25 | customer rating : high"
    )
    assert linearize_e2e_mr("name[X], someNewKey[less than £20]") == "name : X | some new key : less than £ 20"
    with pytest.raises(ValueError):
        linearize_e2e_mr("name[X], broken")


def test_e2e_train_missing(data_dir: Path) -> None:
    with pytest.raises(DataFileError, match="trainset.csv") as info:
        read_split("e2e", "train", data_dir)
    assert "tuetschek/e2e-dataset" in str(info.value) and str(data_dir) in str(info.value)


# --------------------------------------------------------------------------- DART


def test_dart_counts_and_first_records(data_dir: Path) -> None:
    dev, test = read_split("dart", "dev", data_dir), read_split("dart", "test", data_dir)
    assert len(dev) == 2_768 and sum(len(r["references"]) for r in dev) == 6_980
    # 5,097 entries / 12,552 <lex>; one <lex/> (entry Id116) is empty and dropped.
    assert len(test) == 5_097 and sum(len(r["references"]) for r in test) == 12_551
    assert dev[0] == {
        "source": "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina",
        "references": ["A school from Mars Hill, North Carolina, joined in 1973."],
    }
    assert test[0]["source"] == (
        "Hawaii Five-O : notes : Episode: The Flight of the Jewels | "
        "[TABLECONTEXT] : [title] : Jeff Daniels | [TABLECONTEXT] : title : Hawaii Five-O"
    )
    assert test[0]["references"] == ["Jeff Daniels played in the Hawaii Five-O episode The Flight of the Jewels"]


def test_dart_xml_reader_agrees_with_json(data_dir: Path) -> None:
    xml_records = table2text._read_dart_xml(data_dir / "dart" / "dart-v1.1.1-full-dev.xml")
    assert xml_records == read_split("dart", "dev", data_dir)


def test_dart_train_missing(data_dir: Path) -> None:
    with pytest.raises(DataFileError, match="dart-v1.1.1-full-train.json") as info:
        read_split("dart", "train", data_dir)
    assert "Yale-LILY/dart" in str(info.value)


# --------------------------------------------------------------------------- malformed files


def _write(root: Path, relpath: str, text: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_field_count(tmp_path: Path) -> None:
    _write(tmp_path, "glue/SST-2/train.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\textra\n")
    with pytest.raises(MalformedDataError) as info:
        read_split("sst2", "train", tmp_path)
    message = str(info.value)
    assert "train.tsv" in message and "line 3" in message and "expected 2" in message
    assert info.value.line == 3


def test_malformed_label(tmp_path: Path) -> None:
    header = "index\tquestion\tsentence\tlabel\n"
    _write(tmp_path, "glue/QNLI/dev.tsv", header + "0\tq?\ts.\tentailment\n1\tq?\ts.\tmaybe\n")
    with pytest.raises(MalformedDataError, match=r"dev\.tsv, line 3: unparsable label 'maybe'"):
        read_split("qnli", "dev", tmp_path)
    _write(tmp_path, "glue/STS-B/dev.tsv", "sentence1\tsentence2\tscore\na\tb\t7.5\n")
    with pytest.raises(MalformedDataError, match="line 2"):
        read_split("stsb", "dev", tmp_path)
    _write(tmp_path, "glue/SST-2/train.tsv", "sentence\tlabel\nfine\t-1\n")  # -1 only allowed in test
    with pytest.raises(MalformedDataError, match="line 2"):
        read_split("sst2", "train", tmp_path)


def test_malformed_e2e_and_dart(tmp_path: Path) -> None:
    _write(tmp_path, "e2e/devset.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B] area",bad\n')
    with pytest.raises(MalformedDataError, match=r"devset\.csv, line 3"):
        read_split("e2e", "dev", tmp_path)
    _write(tmp_path, "dart/dart-v1.1.1-full-dev.json", '[\n  {"tripleset": [["a", "b", "c"]],\n')
    with pytest.raises(MalformedDataError, match=r"full-dev\.json, line \d+: invalid JSON"):
        read_split("dart", "dev", tmp_path)


def test_file_cut_at_a_line_boundary_is_truncated(tmp_path: Path, data_dir: Path) -> None:
    """A file that parses cleanly but is shorter than the official one is refused, naming the way out."""
    lines = (data_dir / "glue/SST-2/dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    _write(tmp_path, "glue/SST-2/dev.tsv", "".join(lines[:500]))
    with pytest.raises(DataFileError) as info:
        read_split("sst2", "dev", tmp_path)
    msg = str(info.value)
    assert "dev.tsv" in msg and "499 records" in msg and "872" in msg and "datasets.sst2.verify_size" in msg
    assert len(read_split("sst2", "dev", tmp_path, verify_size=False)) == 499
    assert set(OFFICIAL_RECORDS) <= {Path(p).as_posix() for p in download.OFFICIAL_SOURCES}  # known files only


def test_empty_file_is_truncated(tmp_path: Path) -> None:
    _write(tmp_path, "glue/CoLA/raw/in_domain_dev.tsv", "\n")
    with pytest.raises(DataFileError, match="no records"):
        read_split("cola", "dev", tmp_path)


# --------------------------------------------------------------------------- missing files / download


def test_missing_file_names_file_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as info:
        read_split("sst2", "dev", tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "glue" / "SST-2" / "dev.tsv") in message
    assert f"data_dir searched: {tmp_path}" in message
    assert "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip" in message and "SST-2/dev.tsv" in message
    assert "PRIVTUNE_DATA_DIR" in message and "network disabled in tests" in message


def test_missing_k_shot_file_gives_note(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="generate_k_shot_data.py"):
        read_split("qqp", "train", tmp_path, k_shot_seed=42)


def test_offline_env_skips_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVTUNE_OFFLINE", "1")
    with pytest.raises(DataFileError, match="PRIVTUNE_OFFLINE"):
        ensure_file("e2e/devset.csv", tmp_path)


def test_download_refused_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was just free: connecting to it is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/devset.csv"
    monkeypatch.setattr(download, "_download", _REAL_DOWNLOAD)
    monkeypatch.setitem(download.OFFICIAL_SOURCES, "e2e/devset.csv", url)
    with pytest.raises(DataFileError) as info:
        ensure_file("e2e/devset.csv", tmp_path)
    assert url in str(info.value) and "downloading it failed" in str(info.value)
    assert not list((tmp_path / "e2e").iterdir())  # no partial file left behind


def test_download_zip_member_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("SST-2/dev.tsv", "sentence\tlabel\ngreat\t1\n")
        zf.writestr("SST-2/train.tsv", "sentence\tlabel\nawful\t0\n")
    data_dir = tmp_path / "data"
    monkeypatch.setattr(download, "_download", _REAL_DOWNLOAD)
    for split in ("dev", "train", "test"):
        relpath = f"glue/SST-2/{split}.tsv"
        monkeypatch.setitem(download.OFFICIAL_SOURCES, relpath, f"{archive.as_uri()}#SST-2/{split}.tsv")
    assert ensure_file("glue/SST-2/dev.tsv", data_dir) == data_dir / "glue" / "SST-2" / "dev.tsv"
    assert read_split("sst2", "dev", data_dir, verify_size=False) == [{"text_a": "great", "text_b": None, "label": 1}]
    assert (data_dir / "glue" / "SST-2" / "train.tsv").is_file()  # sibling member extracted from the same zip
    assert sorted(p.name for p in (data_dir / "glue" / "SST-2").iterdir()) == ["dev.tsv", "train.tsv"]


def test_a_short_row_is_an_error_in_quoted_files_too(tmp_path: Path) -> None:
    """pandas (under datasets' csv builder) fills a short row with empty cells; the readers refuse it."""
    _write(tmp_path, "e2e/devset.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B], area[y]"\n')
    with pytest.raises(MalformedDataError, match=r"devset\.csv, line 3: expected 2 comma-separated fields, got 1"):
        read_split("e2e", "dev", tmp_path)
    _write(tmp_path, "glue/RTE/dev.tsv", 'sentence1\tsentence2\tlabel\tidx\n"a ""b"""\tc\t0\t0\nd\te\t1\n')
    with pytest.raises(MalformedDataError, match=r"dev\.tsv, line 3: expected 4 tab-separated fields, got 3"):
        read_split("rte", "dev", tmp_path, verify_size=False)
