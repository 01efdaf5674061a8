"""Two result trees compared run by run (privtune.report.versus), and seeds paired in the bootstrap."""
import json

import numpy as np
import pytest

from privtune.report import evidence, versus
from privtune.report.evidence import RunPredictions

N = 872
LABELS = np.random.default_rng(0).integers(0, 2, N)


def preds(correct: int, labels=LABELS) -> list:
    """The first ``correct`` examples right, the rest wrong: runs are nested, a better one gets right what a
    worse one does."""
    p = labels.copy()
    p[correct:] = 1 - p[correct:]
    return p.tolist()


def test_paired_seeds_cancel_what_a_seed_does_to_both_groups():
    # seed 0 lands at 60 %, seed 1 at 90 %; B is A with 20 more examples right at both seeds (+2.3 points)
    a = [RunPredictions("sst2", preds(c), LABELS.tolist()) for c in (523, 785)]
    b = [RunPredictions("sst2", preds(c + 20), LABELS.tolist()) for c in (523, 785)]
    paired = evidence.compare(b, a, "accuracy", paired_seeds=True)
    unpaired = evidence.compare(b, a, "accuracy")
    assert paired.diff == unpaired.diff == pytest.approx(100 * 20 / N)
    assert paired.low > 0  # the seed's 30 points cancel
    assert unpaired.low < -10 and unpaired.high > 10  # drawn independently, they do not
    with pytest.raises(ValueError, match="as many runs"):
        evidence.compare(b, a[:1], "accuracy", paired_seeds=True)


def test_unpaired_draws_are_those_of_the_claims_report():
    # the interval as compare computed it before it took paired_seeds: the claims' numbers do not move
    a = [RunPredictions("sst2", preds(c), LABELS.tolist()) for c in (600, 700)]
    b = [RunPredictions("sst2", preds(c), LABELS.tolist()) for c in (650, 640, 690)]
    c = evidence.compare(a, b, "accuracy")
    assert (c.low, c.high) == pytest.approx((-9.060588685015288, 6.766055045871553), abs=1e-9)


def _run(root, cell, seed, correct, settings=None, seconds=None, steps=20, labels=LABELS):
    d = root / cell / f"seed~{seed}"
    d.mkdir(parents=True)
    (d / "predictions.json").write_text(json.dumps({"task": "sst2", "predictions": preds(correct, labels),
                                                   "labels": labels.tolist()}))
    if settings is not None:  # as training writes it (a zero-shot run: 0 steps, 0 seconds)
        (d / "train_metrics.json").write_text(json.dumps({"seconds": seconds, "steps": steps, "settings": settings}))


def _claims(root, verdicts):
    rows = "\n".join(f"| {k} Some claim. | li2022 | **{v}** |" for k, v in verdicts.items())
    (root / "claims.md").write_text(f"# Claims\n\n| claim | paper | verdict |\n|---|---|---|\n{rows}\n")


def test_two_trees_side_by_side(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cell = "li2022/sst2/minilm/full/eps~8"
    for s, c in enumerate((523, 785)):
        _run(a, cell, s, c, {"precision": "fp32", "lr": 5e-4, "seed": s}, seconds=100.0 + s)
        _run(b, cell, s, c + 20, {"precision": "bf16", "lr": 5e-4, "seed": s}, seconds=50.0 + s)
    _run(b, cell, 2, 700, {"precision": "bf16", "lr": 5e-4, "seed": 2}, seconds=50.0)
    _run(a, "li2022/sst2/minilm/zeroshot/eps~0", 0, 600, {"zero_shot": True, "precision": "fp32"}, 0.0, 0)
    _run(b, "li2022/sst2/minilm/zeroshot/eps~0", 0, 600, {"zero_shot": True, "precision": "bf16"}, 0.0, 0)
    _claims(a, {"(a)": "inconclusive", "(g)": "holds"})
    _claims(b, {"(a)": "inconclusive", "(g)": "does not hold"})
    text = versus.versus(a, b, ("fp32", "bf16"), replicates=500)
    row = next(line for line in text.splitlines() if line.startswith(f"| {cell} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["accuracy", "0, 1"]  # seed 2 is B's alone
    assert float(cells[3]) == pytest.approx(100 * (523 + 785) / 2 / N, abs=0.01)
    assert cells[5].startswith(f"+{100 * 20 / N:.2f} [+")  # the paired interval stays above 0
    assert cells[6] == f"+{100 * 20 / N:.2f} / +{100 * 20 / N:.2f}"
    assert cells[7] == "100, 101 → 50, 51"
    assert cells[8] == "precision: fp32 → bf16"  # lr is equal and the seed is the run's identity
    zero = next(line for line in text.splitlines() if "zeroshot" in line)
    assert "| 0 (examples only) |" in zero and "+0.00 [+0.00, +0.00]" in zero
    assert "| — | precision: fp32 → bf16 |" in zero  # did not train: no time
    assert "| (g) | holds | does not hold | **changed** |" in text and "| (a) | inconclusive | inconclusive | same |" in text
    assert f"Only in bf16 (not compared): {cell} (seed 2)" in text


def test_a_group_that_cannot_be_paired_is_listed_and_the_rest_compared(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "li2022/sst2/m/full/eps~8", 0, 600)
    _run(b, "li2022/sst2/m/full/eps~8", 0, 600, labels=1 - LABELS)  # another evaluation set
    _run(a, "li2022/sst2/m/full/eps~3", 0, 600, {"precision": "fp32"}, 10.0)
    _run(b, "li2022/sst2/m/full/eps~3", 0, 610)  # no train_metrics.json
    _run(a, "li2022/sst2/m/full/eps~inf", 0, 600)
    _run(b, "li2022/sst2/m/full/eps~inf", 0, 600)
    (b / "li2022/sst2/m/full/eps~inf/seed~0/predictions.json").write_text("{}")
    _claims(b, {"(a)": "holds"})
    text = versus.versus(a, b, replicates=100)
    assert "| li2022/sst2/m/full/eps~3 | accuracy | 0 (examples only) |" in text
    assert "li2022/sst2/m/full/eps~8: li2022/sst2/m/full/eps~8/seed~0: the two trees evaluated on different" in text
    assert f"li2022/sst2/m/full/eps~inf: {b}/li2022/sst2/m/full/eps~inf/seed~0/predictions.json: not a readable" in text
    assert f"No train_metrics.json (time and settings not compared): {b}/li2022/sst2/m/full/eps~3/seed~0" in text
    assert "| (a) | no claims.md | holds | not compared |" in text
    # nothing comparable at all, or no runs: an error naming the cause
    assert versus.main([str(a), str(b), "--replicates", "50", "--out", str(tmp_path / "v.md")]) == 0
    assert "| li2022/sst2/m/full/eps~3 |" in (tmp_path / "v.md").read_text()
    for cell in ("eps~3", "eps~inf"):
        (a / "li2022/sst2/m/full" / cell / "seed~0/predictions.json").unlink()
    assert versus.main([str(a), str(b)]) == 2
    assert "no group of runs could be compared" in capsys.readouterr().err
    assert versus.main([str(a), str(tmp_path / "nothing")]) == 2
    assert "no run with predictions.json" in capsys.readouterr().err
