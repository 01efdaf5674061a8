"""Privacy accounting with well-kept libraries: Opacus (RDP, PRV) and Google's
dp-accounting (RDP, PLD) as an independent second opinion.

A run's privacy cost is a list of :class:`GaussianEvent` (the subsampled
Gaussian mechanism: noise multiplier σ, sampling rate q, number of steps),
so that a DP Fisher pass and the training run compose into one guarantee.
The ε reported is the **largest** of the accountants asked (never lower than an
independent accountant says).
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import asdict, dataclass

ACCOUNTANTS = ("rdp", "prv", "dpa_rdp", "dpa_pld")
REPORTED = ("rdp", "prv", "dpa_rdp")  # a run's ε is the largest of these (privacy_report)


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    label: str = "training"

    def __post_init__(self) -> None:
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def default_delta(n: int) -> float:
    """δ = n^-1.1, the choice of Li et al.'s code (E2E: n=42,061 gives 8e-6)."""
    return float(n) ** -1.1


def _opacus_epsilon(events: list[GaussianEvent], delta: float, kind: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0]
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


class _QuietOrders(logging.Filter):
    """dp-accounting's RDP logs a warning for each fractional order whose series does not converge at small
    σ (α = 1.1 … 1.5), and leaves that order out of the bound, as it says. A calibration's bracket search
    visits such σ on every run; the warnings say nothing about the σ found, so they stay out of the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_QUIET = _QuietOrders()


def _dp_accounting_epsilon(events: list[GaussianEvent], delta: float, kind: str) -> float:
    import dp_accounting
    from dp_accounting import pld, rdp

    acc = rdp.RdpAccountant() if kind == "dpa_rdp" else pld.PLDAccountant(value_discretization_interval=1e-3)
    log = logging.getLogger("absl")  # dp-accounting logs through absl
    log.addFilter(_QUIET)
    try:
        for e in events:
            if e.steps > 0:
                acc.compose(dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)), e.steps)
        return float(acc.get_epsilon(delta))
    finally:
        log.removeFilter(_QUIET)


def epsilon(events: list[GaussianEvent], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of the composition of ``events`` under one accountant."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant in ("rdp", "prv"):
        return _opacus_epsilon(events, delta, accountant)
    if accountant in ("dpa_rdp", "dpa_pld"):
        return _dp_accounting_epsilon(events, delta, accountant)
    raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")


@functools.cache
def _run_accountant_class():
    """A :class:`dp_accounting.PrivacyAccountant` whose ε is the largest of :func:`epsilon` under the
    accountants a run reports, so that dp-accounting's calibration finds the σ whose *reported* ε meets
    the target, not only one accountant's. The first accountant named must answer; another that fails
    numerically is left out, as in :func:`privacy_report`. It takes Poisson-subsampled Gaussian events,
    self-composed and composed (a DP Fisher pass, then training)."""
    import dp_accounting

    class RunAccountant(dp_accounting.PrivacyAccountant):
        def __init__(self, accountants: tuple[str, ...]) -> None:
            super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
            self.accountants = accountants
            self.events: list[GaussianEvent] = []

        def _maybe_compose(self, event, count: int, do_compose: bool):
            if isinstance(event, dp_accounting.NoOpDpEvent):
                return None
            if isinstance(event, dp_accounting.ComposedDpEvent):
                for e in event.events:
                    if (error := self._maybe_compose(e, count, do_compose)) is not None:
                        return error
                return None
            if isinstance(event, dp_accounting.SelfComposedDpEvent):
                return self._maybe_compose(event.event, count * event.count, do_compose)
            if (isinstance(event, dp_accounting.PoissonSampledDpEvent)
                    and isinstance(event.event, dp_accounting.GaussianDpEvent)):
                if do_compose:
                    self.events.append(GaussianEvent(event.event.noise_multiplier, event.sampling_probability, count))
                return None
            return self.CompositionErrorDetails(event, "only Poisson-subsampled Gaussian events are accounted")

        def get_epsilon(self, target_delta: float) -> float:
            return _reported_epsilon(tuple(self.events), target_delta, self.accountants)

    return RunAccountant


@functools.lru_cache(maxsize=4096)
def _reported_epsilon(events: tuple[GaussianEvent, ...], delta: float, accountants: tuple[str, ...]) -> float:
    """The reported ε of ``events`` (memoised: the bracket search and Brent's method ask for the same σ
    more than once, and a process calibrates the same setting again for each seed of a run)."""
    return privacy_report(list(events), delta, accountants, required=accountants[0])["epsilon"]


def _as_dp_event(e: GaussianEvent):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
        e.steps)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str | tuple[str, ...] = REPORTED, prior: tuple[GaussianEvent, ...] = (),
                    tolerance: float = 1e-4) -> float:
    """Smallest σ (to ``tolerance`` relative) whose composition with ``prior`` spends ≤ target ε.

    dp-accounting's ``calibrate_dp_mechanism`` (Brent's method, then a check that the σ
    returned spends no more than the target) over the composed event ``prior`` + training,
    with ε the largest under ``accountant`` (one name, or several: by default those a run reports,
    so that the reported ε never exceeds the target). The bracket is found here by
    doubling from σ = 1, so that the error messages say which side failed.
    """
    import dp_accounting

    accountants = (accountant,) if isinstance(accountant, str) else tuple(dict.fromkeys(accountant))
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    prior = tuple(prior)
    if prior and epsilon(list(prior), delta, accountants[0]) >= target_epsilon:
        raise ValueError(f"the earlier mechanisms alone spend ε ≥ {target_epsilon}; no budget is left for training")

    def event(sigma: float):
        return dp_accounting.ComposedDpEvent(
            [*map(_as_dp_event, prior), _as_dp_event(GaussianEvent(sigma, sample_rate, steps))])

    def eps(sigma: float) -> float:
        return _run_accountant_class()(accountants).compose(event(sigma)).get_epsilon(delta)

    hi = 1.0  # bracket [lo, hi]: eps(hi) <= target < eps(lo)
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta} "
                             f"with q={sample_rate}, {steps} steps")
    lo = hi / 2
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            raise ValueError(f"ε={target_epsilon} is so large that it needs no noise (σ < 1e-3) at δ={delta}; "
                             "run non-private instead")
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _run_accountant_class()(accountants), event, target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tolerance * lo))


def privacy_report(events: list[GaussianEvent], delta: float, accountants=REPORTED, required: str = "rdp") -> dict:
    """ε under each accountant; ``epsilon`` is the maximum (the one to report).

    An accountant that fails numerically (PRV on extreme σ, say) is recorded
    under ``accountant_errors``; ``required`` (RDP) must succeed.
    """
    by, errors = {}, {}
    for a in accountants:
        try:
            by[a] = epsilon(events, delta, a)
        except Exception as e:  # noqa: BLE001 - recorded, and the required one below must answer
            if a == required:
                raise
            errors[a] = f"{type(e).__name__}: {str(e)[:200]}"
    return {
        "epsilon": max(by.values()) if by else 0.0,
        "delta": delta,
        "epsilon_by_accountant": by,
        "accountant_errors": errors,
        "events": [asdict(e) for e in events],
        "neighbouring_relation": "add/remove one example (Poisson subsampling)",
    }
