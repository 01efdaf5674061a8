"""The claims report's verdicts on hand-made tables with hand-made per-example predictions: every outcome
(holds, does not hold, inconclusive, not testable, baseline suspect), and no vacuous pass."""
import numpy as np
import pandas as pd
import pytest

from privtune.report import claims, claims_md, evidence
from privtune.report.claims import FAILS, HOLDS, INCONCLUSIVE, SUSPECT, UNTESTABLE, evaluate_claims
from privtune.report.claims_md import render
from privtune.report.evidence import RunPredictions

N = 872  # SST-2's dev set
LABELS = np.random.default_rng(0).integers(0, 2, N)
METRIC = {"sst2": "accuracy", "cola": "mcc", "e2e": "bleu"}


def preds_at(acc: float, seed: int | None = None, labels=LABELS) -> list:
    """Predictions with accuracy ``acc``: the labels with ``1 - acc`` of them flipped, a random set drawn with
    ``seed``, or (no seed) the first ones of one fixed order of the examples, so that runs are nested as trained
    models are (a better run gets right what a worse one gets right: hard examples are hard for all)."""
    p = labels.copy()
    k = round((1 - acc / 100) * len(p))
    wrong = (np.random.default_rng(1000 + seed).choice(len(p), size=k, replace=False) if seed is not None
             else np.random.default_rng(99).permutation(len(p))[:k])
    p[wrong] = 1 - p[wrong]
    return p.tolist()


class Tables:
    """Rows of the long tables and the predictions behind them."""

    def __init__(self):
        self.rows, self.preds = [], {}

    def add(self, task="sst2", method="full", eps="8", ours=80.0, objective="prompt", variant="", seed=0,
            preds=None, **kw):
        row = {"paper": "li2022" if task not in claims.CHILD_TASKS else "xu2021", "task": task, "model": "m",
               "method": method, "eps": eps, "seed": seed, "metric": METRIC[task], "ours": ours,
               "objective": objective, "variant": variant, "batch_size": None, "lr": None, "clip_norm": 0.1,
               "noise_multiplier": 0.7 if eps not in ("inf", "0") else 0.0, "train_batch_size": 1000,
               "dataset_size": 20000, "trainable_parameters": 22_000_000, **kw}
        self.rows.append(row)
        if task == "sst2":
            preds = preds if preds is not None else preds_at(ours)
            self.preds[tuple(str(row[k]) for k in claims.KEY)] = RunPredictions(task, preds, LABELS.tolist())
        elif preds is not None:
            self.preds[tuple(str(row[k]) for k in claims.KEY)] = RunPredictions(task, *preds)
        return self

    def verdicts(self, bench=None):
        return {c.key: v for c, v in evaluate_claims(pd.DataFrame(self.rows), bench, self.preds)}


def test_the_bootstrap_interval_covers_a_binomial_standard_error():
    a = [RunPredictions("sst2", preds_at(80.0, 1), LABELS.tolist())]
    b = [RunPredictions("sst2", preds_at(75.0, 2), LABELS.tolist())]
    c = evidence.compare(a, b, "accuracy")
    assert c.diff == pytest.approx(5.0, abs=0.2)
    assert 1.5 < (c.high - c.low) / 2 < 4.5  # unpaired SE ≈ 2 points; pairing shrinks it a little
    same = evidence.compare(a, a, "accuracy")
    assert same.low == same.high == 0.0  # paired: a run against itself has no uncertainty


def test_seeds_widen_the_interval_and_their_spread_is_reported():
    one = [RunPredictions("sst2", preds_at(80.0, 1), LABELS.tolist())]
    many = [RunPredictions("sst2", preds_at(acc, s), LABELS.tolist()) for s, acc in enumerate((70.0, 80.0, 90.0))]
    ref = [RunPredictions("sst2", preds_at(75.0, 9), LABELS.tolist())]
    narrow, wide = evidence.compare(one, ref, "accuracy"), evidence.compare(many, ref, "accuracy")
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)
    assert wide.spread_a == pytest.approx((70.0, 90.0), abs=0.2) and wide.seeds == (3, 1)


def test_mcc_and_pearson_match_the_metric_functions():
    from privtune.metrics import classification_metrics

    y = np.random.default_rng(3).integers(0, 2, 300)
    p = np.array(preds_at(70.0, 4, labels=y))
    full = np.arange(300)[None, :]
    run = RunPredictions("cola", p.tolist(), y.tolist())
    assert evidence.score(run, "mcc", full)[0] == pytest.approx(100 * classification_metrics("cola", p, y)["mcc"])
    s = np.random.default_rng(5).normal(size=300)
    reg = RunPredictions("stsb", (s + np.random.default_rng(6).normal(size=300)).tolist(), s.tolist())
    want = 100 * classification_metrics("stsb", reg.predictions, reg.labels)["pearson"]
    assert evidence.score(reg, "pearson", full)[0] == pytest.approx(want)


def test_empty_tables_make_every_claim_not_testable():
    v = Tables().add().verdicts()  # a lone DP run tests nothing
    assert {k: x.verdict for k, x in v.items()} == dict.fromkeys("abcdefgh", UNTESTABLE)
    assert "non-private" in v["a"].why


def _sst2(np_acc, dp8, dp3=None, zs=71.0, seeds=1):
    t = Tables().add(method="zeroshot", eps="0", ours=zs)
    for s in range(seeds):
        t.add(eps="inf", ours=np_acc, seed=s)
        t.add(eps="8", ours=dp8, seed=s)
        t.add(eps="3", ours=dp3 if dp3 is not None else dp8 - 1, seed=s)
    return t


def test_a_holds_fails_and_is_inconclusive_by_its_interval():
    assert _sst2(85.0, 85.0, 84.5).verdicts()["a"].verdict == HOLDS
    fails = _sst2(92.0, 78.0).verdicts()["a"]
    assert fails.verdict == FAILS and "σ·C·√d/B" in " ".join(fails.numbers)
    # a 5-point gap, right at the threshold: its interval (about ±2.5) straddles it
    assert _sst2(85.0, 80.0, 80.0).verdicts()["a"].verdict == INCONCLUSIVE


def test_a_dp_above_a_weak_baseline_is_not_a_pass():
    v = _sst2(75.0, 82.0).verdicts()["a"]
    assert v.verdict == SUSPECT and "baseline suspect" in " ".join(v.numbers)
    # a baseline at zero-shot: suspect too
    assert _sst2(71.0, 75.0).verdicts()["a"].verdict == SUSPECT


def test_runs_at_zero_shot_pass_no_claim_a_to_d():
    t = _sst2(71.0, 71.0, 71.0)
    t.add(variant="C~10", clip_norm=10.0, ours=71.0)
    t.add(objective="head", variant="obj~head", ours=50.0)
    for b, lr in ((64, 1e-4), (64, 1e-3), (1024, 1e-4), (1024, 1e-3)):
        t.add(variant=f"bs~{b}_lr~{lr:g}", batch_size=b, lr=lr, ours=71.0)
    v = t.verdicts()
    for key in "abcd":
        assert v[key].verdict != HOLDS, key
    assert v["c"].verdict == v["d"].verdict == v["b"].verdict == UNTESTABLE
    assert "did not learn" in " ".join(v["d"].numbers)


def _grid(values, zs=60.0):
    t = Tables().add(method="zeroshot", eps="0", ours=zs)
    for (b, lr), v in values.items():
        t.add(variant=f"bs~{b}_lr~{lr:g}", batch_size=b, lr=lr, ours=v)
    return t


def test_b_sweep_rule():
    good = {(64, 1e-4): 65.0, (64, 1e-3): 70.0, (1024, 1e-4): 72.0, (1024, 1e-3): 82.0}
    assert _grid(good).verdicts()["b"].verdict == HOLDS
    assert _grid({**good, (64, 1e-4): 81.0}).verdicts()["b"].verdict == FAILS  # small cell as good
    assert _grid({**good, (64, 1e-3): 90.0}).verdicts()["b"].verdict == FAILS  # another cell above it
    assert _grid({(64, 1e-4): 70.0, (64, 1e-3): 72.0}).verdicts()["b"].verdict == UNTESTABLE  # one batch size


@pytest.mark.parametrize("small,large,verdict", [(82.0, 80.0, HOLDS), (75.0, 82.0, FAILS), (80.0, 81.0, INCONCLUSIVE)])
def test_c_clipping_norm(small, large, verdict):
    t = Tables().add(method="zeroshot", eps="0", ours=70.0).add(ours=small)
    t.add(variant="C~10", clip_norm=10.0, ours=large)
    assert t.verdicts()["c"].verdict == verdict


@pytest.mark.parametrize("head,verdict", [(50.9, HOLDS), (85.0, FAILS), (79.5, INCONCLUSIVE)])
def test_d_aligned_objective_beats_the_head(head, verdict):
    t = Tables().add(method="zeroshot", eps="0", ours=71.0).add(ours=80.0)
    t.add(objective="head", variant="obj~head", ours=head)
    assert t.verdicts()["d"].verdict == verdict


def test_d_an_aligned_run_below_zero_shot_tests_nothing():
    t = Tables().add(method="zeroshot", eps="0", ours=71.2).add(ours=70.6)
    t.add(objective="head", variant="obj~head", ours=54.8)
    assert t.verdicts()["d"].verdict == UNTESTABLE


def test_e_memory_from_the_benchmark():
    bench = {"device": "cpu", "records": [{"shape": "s", "method": "ours_bk", "memory_ratio": 1.05, "time_ratio": 1.1},
                                          {"shape": "s", "method": "nonprivate", "memory_ratio": 1.0}]}
    assert Tables().add().verdicts(bench)["e"].verdict == HOLDS
    bench["records"][0]["memory_ratio"] = 2.0
    assert Tables().add().verdicts(bench)["e"].verdict == FAILS
    assert Tables().add().verdicts(None)["e"].verdict == UNTESTABLE
    bench["records"][0]["tensor_memory_ratio"] = 1.01  # a CPU's live tensors decide over its resident set
    e = Tables().add().verdicts(bench)["e"]
    assert e.verdict == HOLDS and "1.01× non-private (tensors; resident set 2.00×)" in e.numbers[0]


@pytest.mark.parametrize("lora,verdict", [(75.0, HOLDS), (90.0, FAILS)])
def test_f_fewer_parameters_do_not_help(lora, verdict):
    t = Tables().add(method="zeroshot", eps="0", ours=70.0).add(method="full", ours=82.0)
    t.add(method="lora", ours=lora)
    assert t.verdicts()["f"].verdict == verdict


def test_f_runs_that_did_not_move_are_no_test():
    t = Tables().add(method="zeroshot", eps="0", ours=71.0).add(method="full", ours=71.0, preds=preds_at(71.0, 1))
    t.add(method="lora", ours=71.0, preds=preds_at(71.0, 1))
    v = t.verdicts()["f"]
    assert v.verdict == UNTESTABLE and "neither learned" in " ".join(v.numbers)


def _child(values: dict, task="cola", n=1000):
    """Child-Tuning runs with an MCC-bearing prediction pattern per method (one list per seed)."""
    y = np.random.default_rng(7).integers(0, 2, n)
    t = Tables()
    for method, accs in values.items():
        for seed, acc in enumerate(accs):
            p = [int(np.bincount(y).argmax())] * n if acc is None else preds_at(acc, labels=y)
            t.add(task, method=method, eps="inf", objective="head", seed=seed, ours=0.0, preds=(p, y.tolist()))
    return t


def test_g_h_child_tuning_with_seeds():
    v = _child({"vanilla": [70.0, 71.0, 70.0], "ct_f": [78.0, 79.0, 78.0], "ct_d": [80.0, 81.0, 80.0]}).verdicts()
    assert (v["g"].verdict, v["h"].verdict) == (HOLDS, HOLDS)
    v = _child({"vanilla": [80.0, 81.0, 80.0], "ct_f": [70.0, 71.0, 70.0], "ct_d": [70.0, 69.0, 70.0]}).verdicts()
    assert v["g"].verdict == FAILS and v["h"].verdict == INCONCLUSIVE
    v = _child({"vanilla": [75.0, 75.5, 76.0], "ct_f": [76.0, 75.0, 76.5], "ct_d": [85.0, 84.0, 85.0]}).verdicts()
    assert v["g"].verdict == INCONCLUSIVE and v["h"].verdict == HOLDS


def test_child_runs_at_the_majority_class_are_not_tests():
    v = _child({"vanilla": [None], "ct_f": [None], "ct_d": [None]}).verdicts()
    assert v["g"].verdict == v["h"].verdict == UNTESTABLE
    assert "constant prediction" in " ".join(v["g"].numbers)


def test_missing_predictions_make_a_comparison_not_testable():
    t = _sst2(85.0, 83.0)
    t.preds.clear()
    v = t.verdicts()["a"]
    assert v.verdict == UNTESTABLE


def test_report_states_every_rule_its_method_and_each_interval():
    t = _sst2(85.0, 85.0, 84.5, seeds=2)
    results = evaluate_claims(pd.DataFrame(t.rows), None, t.preds)
    text = render(results, "quick", spread=claims_md.seed_spread(pd.DataFrame(t.rows)))
    for c in claims.CLAIMS:
        assert c.rule in text and f"({c.key})" in text
    assert "paired two-level bootstrap" in text and "95 % interval [" in text and "**holds**" in text
    assert "over 2 seeds" in text


def test_runs_are_listed_against_the_zero_shot_row():
    t = _sst2(80.0, 70.5)
    t.add(objective="head", variant="obj~head", ours=50.0)
    lines = claims_md.against_zero_shot(pd.DataFrame(t.rows))
    assert len(lines) == 3  # the head run has no zero-shot row of its own objective
    assert any("ε=8: 70.50, zero-shot 71.00 (-0.50)" in x for x in lines)


def test_a_run_whose_epsilon_does_not_hold_enters_no_verdict():
    """allow_unaccounted runs (guarantee_holds false) are left out and listed; alone they test nothing."""
    t = Tables().add(method="zeroshot", eps="0", ours=71.0).add(eps="inf", ours=85.0)
    t.add(eps="8", ours=83.0, guarantee_holds=False)
    assert t.verdicts()["a"].verdict == UNTESTABLE
    t.rows[-1]["guarantee_holds"] = True
    assert t.verdicts()["a"].verdict == HOLDS
    t.rows[-1]["guarantee_holds"] = False
    left = claims.unaccounted_runs(pd.DataFrame(t.rows))
    assert len(left) == 1 and "ε=8" in left[0]
    assert "Left out of every verdict" in render(evaluate_claims(pd.DataFrame(t.rows)), left_out=left)
