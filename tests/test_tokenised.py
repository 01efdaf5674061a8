"""Encoding through a cached Dataset.map (privtune.objectives.tokenised): equal to encoding in memory for
every objective family, read back without tokenising on a rerun, and keyed on what the encoding reads."""
from __future__ import annotations

from pathlib import Path

import pytest

from privtune.io import write_jsonl
from privtune.models.load import load_tokenizer
from privtune.objectives import core, objective
from privtune.objectives.tokenised import CACHE_DIR, encode_file

PAIRS = [{"text_a": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "text_b": None, "label": i % 2}
         for i in range(7)]
SCORES = [{"text_a": f"a cat {i}", "text_b": f"a dog {i}", "label": 0.5 * i} for i in range(5)]
TABLES = [{"source": f"name : Place{i} | area : riverside", "references": [f"Place{i} is by the river.", "ok"]}
          for i in range(4)]

BYTE_WORDS = {"label_words": ["-", "+"], "label_prefix": ""}  # one token each for the tiny byte tokenizer
CASES = [  # (model, kind, task, objective name, prompt, records)
    ("bert", "classification", "sst2", "head", {}, PAIRS),
    ("bert", "classification", "sst2", "prompt", BYTE_WORDS, PAIRS),
    ("bert", "classification", "sst2", "prompt", {"family": "similarity"}, PAIRS),
    ("llama", "classification", "sst2", "prompt", BYTE_WORDS, PAIRS),
    ("bert", "regression", "stsb", "head", {}, SCORES),
    ("llama", "table2text", "e2e", "head", {}, TABLES),
]


@pytest.mark.parametrize("model,kind,task,name,prompt,records", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4].get('family', 'default')}" for c in CASES])
def test_cached_encoding_equals_encoding_in_memory_and_is_reused(tiny_models, tmp_path, monkeypatch, model, kind,
                                                                  task, name, prompt, records):
    model_dir = tiny_models / model
    tok = load_tokenizer(model_dir)
    obj = objective(kind, task, name, 1 if kind == "regression" else 2, prompt, model_dir=model_dir)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, records)
    fresh = obj.encode(tok, records, 32)
    first = encode_file(obj, tok, path, 32)
    assert first == fresh and type(first[0]) is type(fresh[0])
    assert len(list((tmp_path / CACHE_DIR).glob("train-*.arrow"))) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a rerun tokenised again instead of reading the cache")

    monkeypatch.setattr(core.Objective, "encode", no_tokenising)
    assert encode_file(obj, tok, path, 32) == fresh


def test_a_changed_input_makes_a_new_key(tiny_models, tmp_path):
    model_dir = tiny_models / "bert"
    tok = load_tokenizer(model_dir)
    obj = objective("classification", "sst2", "head", 2, {}, model_dir=model_dir)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, PAIRS)
    encode_file(obj, tok, path, 32)
    short = encode_file(obj, tok, path, 6)  # another max_length
    assert max(len(e.input_ids) for e in short) <= 6
    write_jsonl(path, PAIRS[:3])  # another file content
    assert len(encode_file(obj, tok, path, 32)) == 3
    assert len(list((tmp_path / CACHE_DIR).glob("*.arrow"))) == 3


def test_no_cache_writes_nothing(tiny_models, tmp_path: Path):
    model_dir = tiny_models / "bert"
    obj = objective("classification", "sst2", "head", 2, {}, model_dir=model_dir)
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    assert len(encode_file(obj, load_tokenizer(model_dir), tmp_path / "train.jsonl", 32, cache=False)) == 7
    assert not (tmp_path / CACHE_DIR).exists()
