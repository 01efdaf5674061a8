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


def test_unpaired_draws_are_unchanged_by_the_option():
    a = [RunPredictions("sst2", preds(c), LABELS.tolist()) for c in (600, 700)]
    b = [RunPredictions("sst2", preds(c), LABELS.tolist()) for c in (650, 640, 690)]
    assert evidence.compare(a, b, "accuracy") == evidence.compare(a, b, "accuracy", paired_seeds=False)


def _run(root, cell, seed, correct, settings=None, seconds=None, labels=LABELS):
    d = root / cell / f"seed~{seed}"
    d.mkdir(parents=True)
    (d / "predictions.json").write_text(json.dumps({"task": "sst2", "predictions": preds(correct, labels),
                                                   "labels": labels.tolist()}))
    if settings is not None:
        (d / "train_metrics.json").write_text(json.dumps({"seconds": seconds, "settings": settings}))


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
    _run(a, "li2022/sst2/minilm/zeroshot/eps~0", 0, 600)
    _run(b, "li2022/sst2/minilm/zeroshot/eps~0", 0, 600)
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
    assert "+0.00 [+0.00, +0.00]" in zero and "| — | — |" in zero
    assert "| (g) | holds | does not hold | **changed** |" in text and "| (a) | inconclusive | inconclusive | same |" in text
    assert f"Only in bf16 (not compared): {cell}/seed~2" in text


def test_different_evaluation_sets_are_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "li2022/sst2/m/full/eps~8", 0, 600)
    _run(b, "li2022/sst2/m/full/eps~8", 0, 600, labels=1 - LABELS)
    assert versus.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "li2022/sst2/m/full/eps~8/seed~0" in err and "different examples" in err
    assert versus.main([str(a), str(tmp_path / "nothing")]) == 2
    assert "no run with predictions.json" in capsys.readouterr().err
