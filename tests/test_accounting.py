"""σ calibration and the independent cross-check of ε."""
import math

import pytest

from privtune.dp.accounting import GaussianEvent, calibrate_noise, default_delta, epsilon, privacy_report


@pytest.mark.parametrize("target,q,steps", [(3.0, 0.02, 200), (8.0, 0.05, 100)])
def test_calibration_round_trips_and_agrees_with_a_second_accountant(target, q, steps):
    delta = 1e-5
    sigma = calibrate_noise(target, delta, q, steps)
    ours = epsilon([GaussianEvent(sigma, q, steps)], delta, "rdp")
    assert ours <= target and ours >= 0.99 * target  # within 1%, never above the target
    other = epsilon([GaussianEvent(sigma, q, steps)], delta, "dpa_rdp")  # Google's dp-accounting
    assert abs(other - ours) / ours < 0.01
    # tighter accountants may say less, never more than RDP's bound
    assert epsilon([GaussianEvent(sigma, q, steps)], delta, "prv") <= ours * 1.01


def test_report_takes_the_largest_epsilon():
    rep = privacy_report([GaussianEvent(1.0, 0.05, 50)], 1e-5, accountants=("rdp", "prv", "dpa_rdp"))
    assert rep["epsilon"] == max(rep["epsilon_by_accountant"].values())


def test_composition_with_a_prior_mechanism_costs_more_and_calibration_accounts_for_it():
    delta, q, steps = 1e-5, 0.05, 80
    fisher = GaussianEvent(5.0, 1.0, 1, "dp-fisher")
    alone = epsilon([GaussianEvent(1.0, q, steps)], delta)
    both = epsilon([fisher, GaussianEvent(1.0, q, steps)], delta)
    assert both > alone
    s_alone = calibrate_noise(8.0, delta, q, steps)
    s_both = calibrate_noise(8.0, delta, q, steps, prior=(fisher,))
    assert s_both > s_alone
    assert epsilon([fisher, GaussianEvent(s_both, q, steps)], delta) <= 8.0


def test_default_delta_matches_li_et_al():
    assert math.isclose(default_delta(42061), 8.2e-6, rel_tol=0.02)


@pytest.mark.parametrize("bad", [dict(noise_multiplier=0, sample_rate=0.1, steps=1),
                                 dict(noise_multiplier=1, sample_rate=1.5, steps=1)])
def test_bad_events_are_refused(bad):
    with pytest.raises(ValueError):
        GaussianEvent(**bad)


def test_nonpositive_target_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_noise(0, 1e-5, 0.1, 10)


def test_calibration_brackets_small_noise_for_large_epsilon():
    sigma = calibrate_noise(50.0, 1e-5, 0.05, 50)
    assert sigma < 0.5  # not stuck at a fixed lower bound
    assert epsilon([GaussianEvent(sigma, 0.05, 50)], 1e-5) <= 50.0


def test_epsilon_spent_so_far_grows_to_the_reported_epsilon():
    from privtune.dp.plan import plan_privacy
    from privtune.training.settings import RunSettings

    plan = plan_privacy(RunSettings(kind="classification", epsilon=3.0, batch_size=50, steps=20), 1000)
    spent = [plan.epsilon_after(k) for k in (0, 1, 10, 20)]
    assert spent[0] == 0.0 and spent == sorted(spent) and spent[-1] == pytest.approx(3.0, rel=0.01)


def _reference_sigma(target, delta, q, steps, prior=(), accountant="rdp"):
    """A plain geometric bisection to 1e-6 relative: the σ the library's calibration must find."""
    def eps(sigma):
        return epsilon([*prior, GaussianEvent(sigma, q, steps)], delta, accountant)

    lo, hi = 0.05, 50.0
    assert eps(lo) > target >= eps(hi)
    while (hi - lo) / hi > 1e-6:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


@pytest.mark.parametrize("target,q,steps,prior,accountant", [
    (3.0, 0.02, 200, (), "rdp"),
    (8.0, 1024 / 42061, 1000, (), "rdp"),
    (8.0, 0.05, 80, (GaussianEvent(5.0, 1.0, 1, "dp-fisher"),), "rdp"),
    (3.0, 0.05, 50, (), "dpa_rdp"),
])
def test_library_calibration_finds_the_reference_sigma(target, q, steps, prior, accountant):
    """dp-accounting's calibrate_dp_mechanism, asked through our accountant adapter, returns the
    smallest σ within the target (to its tolerance), composed events and either accountant alike."""
    delta = 1e-5
    sigma = calibrate_noise(target, delta, q, steps, accountant, prior=prior)
    reference = _reference_sigma(target, delta, q, steps, prior, accountant)
    assert sigma == pytest.approx(reference, rel=2e-4)
    assert epsilon([*prior, GaussianEvent(sigma, q, steps)], delta, accountant) <= target


def test_the_adapter_refuses_a_mechanism_it_does_not_account():
    import dp_accounting

    from privtune.dp.accounting import _run_accountant_class

    with pytest.raises(dp_accounting.UnsupportedEventError, match="Poisson-subsampled Gaussian"):
        _run_accountant_class()("rdp").compose(dp_accounting.LaplaceDpEvent(1.0))


def test_calibration_meets_the_target_under_every_reported_accountant():
    """By default σ is calibrated to the reported ε (the largest of the reported accountants): dp-accounting's
    RDP, which says slightly more than Opacus' at the same σ, meets the target too."""
    from privtune.dp.accounting import REPORTED

    delta, q, steps = 8e-6, 1024 / 42061, 300
    sigma = calibrate_noise(8.0, delta, q, steps)
    report = privacy_report([GaussianEvent(sigma, q, steps)], delta)
    assert set(report["epsilon_by_accountant"]) == set(REPORTED)
    assert report["epsilon"] <= 8.0 and report["epsilon"] >= 0.999 * 8.0
    rdp_only = calibrate_noise(8.0, delta, q, steps, "rdp")
    assert rdp_only <= sigma  # one accountant alone may ask for (slightly) less noise


def test_calibration_asks_the_accountants_once_per_noise_multiplier(monkeypatch):
    """The bracket search and Brent's method revisit σ; each σ is accounted once (memoised), and the σ found
    is the one the unmemoised search finds."""
    from privtune.dp import accounting

    asked = []
    real = accounting.privacy_report

    def counting(events, *args, **kwargs):
        asked.append(tuple(events))
        return real(events, *args, **kwargs)

    accounting._reported_epsilon.cache_clear()
    monkeypatch.setattr(accounting, "privacy_report", counting)
    sigma = calibrate_noise(8.0, 1e-5, 0.05, 120, "rdp")
    assert asked and len(asked) == len(set(asked))
    accounting._reported_epsilon.cache_clear()
    monkeypatch.setattr(accounting, "_reported_epsilon", accounting._reported_epsilon.__wrapped__)
    assert calibrate_noise(8.0, 1e-5, 0.05, 120, "rdp") == sigma
    assert len(asked) > len(set(asked))  # without the memo the same σ is accounted again
