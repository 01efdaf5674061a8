"""Hyperparameters are chosen on a validation split carved from the training data: disjoint, seeded, scored."""
import json

import pytest

from privtune.selection import carve, main


def test_the_carve_is_disjoint_seeded_and_checked():
    records = [{"text_a": str(i), "label": i % 2} for i in range(50)]
    rest, val = carve(records, 10)
    assert len(val) == 10 and len(rest) == 40
    assert not {r["text_a"] for r in rest} & {r["text_a"] for r in val}
    assert carve(records, 10) == (rest, val) and carve(records, 10, seed=1)[1] != val
    with pytest.raises(ValueError, match="between 1 and 49"):
        carve(records, 50)


def test_candidates_are_scored_on_the_held_out_examples(tiny_models, data_dir, tmp_path):
    out = tmp_path / "sel.json"
    main(["--task", "sst2", "--model", str(tiny_models / "bert"), "--data-dir", str(data_dir), "--val-size", "40",
          "--base", json.dumps({"max_length": 32, "threads": 1, "batch_size": 8, "physical_batch_size": 8}),
          "--candidate", json.dumps({"steps": 2, "lr": 1e-3, "train_size": 32}),
          "--candidate", json.dumps({"epsilon": 8, "steps": 2, "lr": 1e-3, "train_size": 64}), "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["train_examples"] for r in rows] == [32, 64] and all(r["validation_examples"] == 40 for r in rows)
    assert all(0 <= r["validation"] <= 1 and r["interval"][0] <= 100 * r["validation"] <= r["interval"][1]
               for r in rows)
    assert rows[1]["epsilon"] == pytest.approx(8, rel=0.02) and rows[0]["epsilon"] == float("inf")
