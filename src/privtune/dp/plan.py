"""What a run's settings cost in privacy, fixed before the first step, and the run's privacy report.

:func:`plan_privacy` turns the settings and the dataset size into steps, the sampling rate, δ
and the noise multiplier calibrated to the target ε (refusing settings ε would not cover:
:mod:`privtune.dp.guarantee`); :func:`privacy_record` writes what ``privacy.json`` holds, all
that is needed to re-derive ε (:mod:`privtune.dp.audit` does).
"""
from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path

from privtune.dp import accounting, guarantee, sampling
from privtune.io import file_sha256
from privtune.training.settings import RunSettings


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run's guarantee is computed from, fixed before the first step."""

    private: bool
    dataset_size: int
    batch_size: int  # expected logical batch size
    steps: int
    sample_rate: float
    delta: float | None
    noise_multiplier: float
    sampling: str
    prior: tuple[accounting.GaussianEvent, ...] = ()
    unaccounted: tuple[str, ...] = ()  # settings the ε does not cover (allowed by train.allow_unaccounted)

    @property
    def events(self) -> list[accounting.GaussianEvent]:
        own = [accounting.GaussianEvent(self.noise_multiplier, self.sample_rate, self.steps, "training")]
        return [*self.prior, *(own if self.private else [])]

    def epsilon_after(self, steps: int, accountant: str = "rdp") -> float:
        """ε spent once ``steps`` training steps are done (prior releases included): a function of the
        settings alone, so it can be shown while training."""
        done = [accounting.GaussianEvent(self.noise_multiplier, self.sample_rate, steps, "training")] if steps else []
        events = [*self.prior, *done]
        return accounting.epsilon(events, self.delta, accountant) if events else 0.0


def plan_privacy(s: RunSettings, n: int, mask_source: str | None = None) -> PrivacyPlan:
    """Steps, sampling rate, δ and the calibrated σ of a run on ``n`` training examples.

    Raises before any work when the request cannot be met (δ ≥ 1/n, an ε that the
    earlier mechanisms already spend, a setting the ε would not cover: privtune.dp.guarantee),
    naming the config key. ``mask_source``: where a Child-Tuning_D mask came from.
    """
    private = s.epsilon is not None
    scheme = guarantee.sampling_scheme(s.sampling, private)
    unaccounted = tuple(guarantee.check(private, s.allow_unaccounted, sampling=scheme,
                                        verify_engine=s.verify_engine, mask_source=mask_source))
    batch_size = min(s.batch_size, n)
    steps = s.steps or sampling.num_steps(n, batch_size, s.epochs)
    q = batch_size / n
    delta = accounting.default_delta(n) if s.delta == "auto" else float(s.delta)
    prior = tuple(accounting.GaussianEvent(**e) for e in s.prior_events)
    if not private:
        return PrivacyPlan(False, n, batch_size, steps, q, None, 0.0, scheme, prior)
    if not delta < 1 / n:
        raise ValueError(f"train.delta = {delta} is not below 1/n = {1 / n:.3g} for n = {n} training examples: "
                         "choose a smaller delta (or 'auto', which is n^-1.1)")
    # to the reported ε (the largest of the reported accountants), the run's own accountant first
    sigma = accounting.calibrate_noise(s.epsilon, delta, q, steps, (s.accountant, *accounting.REPORTED), prior=prior)
    return PrivacyPlan(True, n, batch_size, steps, q, delta, sigma, scheme, prior, unaccounted)


def noise_rng_record(secure: bool) -> str:
    return ("keyed by 128 bits from the operating system's entropy (secrets.randbits), kept only in the checkpoint "
            "while the run lasts; the key is not recorded (privtune.dp.rng)" if secure else
            "seeded from the run's seed: reproducible, but anyone who knows the seed can regenerate the noise "
            "and remove it. Not for a real release: set train.secure_rng: true")


def sampler_rng_record(secure: bool) -> str:
    return ("Poisson batches drawn from the same 128 secret bits from the operating system, kept only in the "
            "checkpoint (deleted when the run finishes): which examples were in which batch is not recoverable"
            if secure else
            "Poisson batches drawn from the run's seed: anyone who knows it knows which examples were in each "
            "batch, which the subsampling amplification credited in ε assumes secret. Not for a real release: "
            "set train.secure_rng: true")


def versions() -> dict:
    import opacus
    import torch
    import transformers

    import dp_accounting  # noqa: F401
    from importlib.metadata import version

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "opacus": opacus.__version__, "dp-accounting": version("dp-accounting")}


def _fisher_mask_record(mask_file: Path | None, mask_info: dict | None, private: bool) -> tuple[dict | None, list]:
    """What the privacy report says about a Child-Tuning_D mask, and its warnings."""
    if mask_file is None:
        return None, []
    info = mask_info or {}
    source = info.get("source", "train")
    record = {"file": str(mask_file), "source": source, "data": info.get("data"),
              "sha256": file_sha256(Path(mask_file)) if Path(mask_file).exists() else None,
              "covered_by_reported_epsilon": source != "train"}
    if source == "dp":
        record["note"] = (f"DP Fisher at ε_F = {info.get('fisher_epsilon')} (σ_F = {info.get('noise_multiplier')}), "
                          "composed with training into the reported ε")
    elif source == "public":
        record["note"] = f"Fisher of {info.get('data')}, named public in the config: no privacy cost if it is public"
    warnings = []
    if private and source == "train":
        warnings.append(f"The Child-Tuning_D mask {mask_file} was computed from the training data without noise: "
                        "the ε reported here does NOT cover it. Use child.fisher_source: dp or public.")
    return record, warnings


def privacy_record(plan: PrivacyPlan, s: RunSettings, mask_file: Path | None = None,
                   skipped: list[int] = (), mask_info: dict | None = None, train_file: Path | None = None) -> dict:
    """The run's ``privacy.json``: ε under each accountant and all that is needed to re-derive it."""
    if not plan.private:
        report = {"epsilon": math.inf, "delta": None}
    else:
        report = accounting.privacy_report(plan.events, plan.delta)
    per_epoch = []
    if plan.private:
        steps_per_epoch = max(1, round(1 / plan.sample_rate))
        for k in range(steps_per_epoch, plan.steps + 1, steps_per_epoch):
            per_epoch.append({"step": k, "epsilon": accounting.epsilon(
                [*plan.prior, accounting.GaussianEvent(plan.noise_multiplier, plan.sample_rate, k)],
                plan.delta, s.accountant)})
    fisher_mask, warnings = _fisher_mask_record(mask_file, mask_info, plan.private)
    warnings += [f"{guarantee.ALTERNATIVES[k][0]} (allowed by train.allow_unaccounted)" for k in plan.unaccounted]
    report.update(
        private=plan.private, target_epsilon=s.epsilon, noise_multiplier=plan.noise_multiplier,
        clip_norm=s.clip_norm, sample_rate=plan.sample_rate, steps=plan.steps, dataset_size=plan.dataset_size,
        expected_batch_size=plan.batch_size, sampling=plan.sampling, accountant_calibrated_with=s.accountant,
        epsilon_by_epoch=per_epoch, seed=s.seed, skipped_steps=list(skipped),
        noise_rng=noise_rng_record(s.secure_rng), sampler_rng=sampler_rng_record(s.secure_rng),
        secure_rng=s.secure_rng, guarantee_holds=not plan.unaccounted, unaccounted=list(plan.unaccounted),
        covers=guarantee.COVERS if plan.private else "non-private: no guarantee",
        guarantee=("(ε, δ)-DP under Poisson subsampling, as accounted" if plan.sampling == "poisson" else
                   "accounted as Poisson subsampling with q = B/n, but batches were fixed-size shuffled: "
                   "the common approximation (as in Li et al.'s code), not a proof for this sampler"),
        fisher_mask=fisher_mask, warnings=warnings, versions=versions(),
        # what the audit (privtune.dp.audit) checks dataset_size against
        train_file=None if train_file is None else str(train_file),
        train_file_sha256=None if train_file is None else file_sha256(Path(train_file)),
    )
    return report
