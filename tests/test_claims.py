"""The claims report's verdict rules on hand-made tables: holds, does not hold, not testable."""
import pandas as pd
import pytest

from privtune.report import claims
from privtune.report.claims import FAILS, HOLDS, UNTESTABLE, evaluate_claims, render


def row(task="sst2", model="m", method="full", eps="8", ours=80.0, objective="prompt", variant="", **kw):
    metric = {"sst2": "accuracy", "cola": "mcc", "e2e": "bleu"}[task]
    base = {"task": task, "model": model, "method": method, "eps": eps, "seed": 0, "metric": metric, "ours": ours,
            "objective": objective, "variant": variant, "batch_size": None, "lr": None, "clip_norm": 0.1,
            "noise_multiplier": 0.7 if eps not in ("inf", "0") else 0.0, "train_batch_size": 1000,
            "dataset_size": 20000, "trainable_parameters": 22_000_000}
    return {**base, **kw}


def verdicts(rows, bench=None):
    return {c.key: v for c, v in evaluate_claims(pd.DataFrame(rows), bench)}


def test_empty_tables_make_every_claim_not_testable():
    v = verdicts([row(metric_rows_only=True)])  # a lone DP run tests nothing
    assert {k: x.verdict for k, x in v.items()} == dict.fromkeys("abcdefgh", UNTESTABLE)
    assert "non-private" in v["a"].why


@pytest.mark.parametrize("dp,verdict", [(77.0, HOLDS), (70.0, FAILS)])
def test_a_dp_within_a_few_points_of_nonprivate(dp, verdict):
    v = verdicts([row(eps="inf", ours=80.0), row(eps="8", ours=dp), row(eps="3", ours=dp - 1)])["a"]
    assert v.verdict == verdict
    if verdict == FAILS:  # says why: the noise regime of the run
        assert "σ·C·√d/B" in v.why and "n = 20,000" in v.why


def _grid(values):
    return [row(variant=f"bs~{b}_lr~{lr:g}", batch_size=b, lr=lr, ours=v) for (b, lr), v in values.items()]


def test_b_sweep_rule():
    good = {(64, 1e-4): 60.0, (64, 1e-3): 65.0, (1024, 1e-4): 70.0, (1024, 1e-3): 80.0}
    assert verdicts(_grid(good))["b"].verdict == HOLDS
    bad = {**good, (64, 1e-4): 90.0}
    assert verdicts(_grid(bad))["b"].verdict == FAILS
    assert verdicts(_grid({(64, 1e-4): 1.0, (64, 1e-3): 2.0}))["b"].verdict == UNTESTABLE  # one batch size


@pytest.mark.parametrize("small,large,verdict", [(80.0, 80.5, HOLDS), (75.0, 80.0, FAILS)])
def test_c_clipping_norm(small, large, verdict):
    rows = [row(ours=small, clip_norm=0.1), row(variant="C~10", clip_norm=10.0, ours=large)]
    assert verdicts(rows)["c"].verdict == verdict


@pytest.mark.parametrize("head,verdict", [(50.9, HOLDS), (79.5, FAILS)])
def test_d_aligned_objective_beats_the_head(head, verdict):
    rows = [row(ours=80.0), row(objective="head", variant="obj~head", ours=head)]
    assert verdicts(rows)["d"].verdict == verdict


def test_e_memory_from_the_benchmark():
    bench = {"device": "cpu", "records": [{"shape": "s", "method": "ours_bk", "memory_ratio": 1.05, "time_ratio": 1.1},
                                          {"shape": "s", "method": "nonprivate", "memory_ratio": 1.0}]}
    assert verdicts([row()], bench)["e"].verdict == HOLDS
    bench["records"][0]["memory_ratio"] = 2.0
    assert verdicts([row()], bench)["e"].verdict == FAILS
    assert verdicts([row()], None)["e"].verdict == UNTESTABLE


@pytest.mark.parametrize("lora,verdict", [(30.0, HOLDS), (40.0, FAILS)])
def test_f_fewer_parameters_do_not_help(lora, verdict):
    rows = [row("e2e", method="full", ours=35.0, objective="head"), row("e2e", method="lora", ours=lora,
                                                                        objective="head")]
    assert verdicts(rows)["f"].verdict == verdict


@pytest.mark.parametrize("f,d,g,h", [(45.0, 46.0, HOLDS, HOLDS), (39.0, 41.0, FAILS, HOLDS),
                                     (42.0, 41.0, HOLDS, FAILS)])
def test_g_h_child_tuning(f, d, g, h):
    rows = [row("cola", method=m, eps="inf", objective="head", ours=v)
            for m, v in (("vanilla", 40.0), ("ct_f", f), ("ct_d", d))]
    v = verdicts(rows)
    assert (v["g"].verdict, v["h"].verdict) == (g, h)


def test_report_states_every_rule_and_its_threshold():
    results = evaluate_claims(pd.DataFrame([row(eps="inf"), row()]))
    text = render(results, "quick")
    for c in claims.CLAIMS:
        assert c.rule in text and f"({c.key})" in text
    assert f"{claims.DP_GAP:g} points" in text and "**holds**" in text


def test_runs_are_listed_against_the_zero_shot_row():
    rows = [row(method="zeroshot", eps="0", ours=71.0), row(eps="8", ours=70.5), row(eps="inf", ours=80.0),
            row(objective="head", variant="obj~head", ours=50.0)]
    lines = claims.against_zero_shot(pd.DataFrame(rows))
    assert len(lines) == 2  # the head run has no zero-shot row of its own objective
    assert any("ε=8: 70.50, zero-shot 71.00 (-0.50)" in x for x in lines)
    assert "Reference" in render(evaluate_claims(pd.DataFrame(rows)), "quick", lines)


def test_ties_of_runs_that_learned_nothing_are_not_tests():
    child = [row("cola", method=m, eps="inf", objective="head", ours=0.0) for m in ("vanilla", "ct_f", "ct_d")]
    v = verdicts(child)
    assert v["g"].verdict == v["h"].verdict == UNTESTABLE and "tie" in v["h"].why
    flat = [row("e2e", method="zeroshot", eps="0", ours=22.0, objective="head"),
            row("e2e", method="full", ours=22.1, objective="head"), row("e2e", method="lora", ours=22.0,
                                                                        objective="head")]
    v = verdicts(flat)["f"]
    assert v.verdict == UNTESTABLE and "zero-shot" in v.why and v.numbers


def test_a_run_whose_epsilon_does_not_hold_enters_no_verdict():
    """allow_unaccounted runs (guarantee_holds false) are left out and listed; alone they test nothing."""
    rows = [row(eps="inf", ours=80.0), row(eps="8", ours=79.0, guarantee_holds=False)]
    assert verdicts(rows)["a"].verdict == UNTESTABLE
    assert verdicts([rows[0], {**rows[1], "guarantee_holds": True}])["a"].verdict == HOLDS
    left = claims.unaccounted_runs(pd.DataFrame(rows))
    assert len(left) == 1 and "ε=8" in left[0]
    assert "Left out of every verdict" in render(evaluate_claims(pd.DataFrame(rows)), left_out=left)
