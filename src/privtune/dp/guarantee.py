"""What a DP run's ε covers, and the settings under which it does not hold.

A run's ε is computed for one mechanism: each step, a Poisson-subsampled batch (each example in
with probability q, independently), every example's gradient clipped to norm C, the sum plus
Gaussian noise N(0, σ²C²), composed over the steps with any earlier release the run names (a DP
Fisher). It covers everything computed from the privatized gradients: the released model, the
steps taken. It does not cover anything computed from the training data outside that mechanism (a
loss, a batch's size, a gradient norm before noise: see ``diagnostics``), nor a statistic of the noise
drawn (its norm: the run releases only its check against σ, ``privtune.dp.audit.noise_check``).

Three settings leave the mechanism the ε was computed for. Under DP each is refused unless
``train.allow_unaccounted: true`` is set, and then the run's ``guarantee_holds`` is false (in
``privacy.json``, ``metrics.json``, the tables and the claims report):

* ``sampling: shuffle``: fixed-size batches of a permutation, accounted as if Poisson;
* ``verify_engine: false``: nothing checks that every trainable parameter's gradient passed
  through the clipping engine (a parameter it missed would be released unclipped);
* a Child-Tuning_D mask from the training data without noise (``child.fisher_source: train``).

This module imports no torch: the workflow checks a config with it before building any job.
"""
from __future__ import annotations

def sampling_scheme(given: str | None, private: bool) -> str:
    """The batch sampling a run uses: ``given``, else Poisson under DP (what ε is accounted for) and
    shuffled epochs otherwise (every example once per epoch, the non-private baseline's)."""
    return given or ("poisson" if private else "shuffle")


COVERS = ("ε covers the released model and everything computed from the privatized gradients (the steps); "
          "not the training data's statistics (losses, batch sizes, gradient norms before noise) nor the noise "
          "drawn (its norm), which a DP run writes only with train.diagnostics, to diagnostics_nonprivate.json")

ALTERNATIVES = {
    "sampling": ("train.sampling: shuffle (fixed-size shuffled batches) is accounted as if Poisson subsampling, "
                 "so the reported ε does not hold for it", "use train.sampling: poisson (the default under DP)"),
    "verify_engine": ("train.verify_engine: false leaves unchecked that every trainable parameter is clipped",
                      "remove train.verify_engine: false (the check runs once, at the first step)"),
    "fisher_source": ("child.fisher_source: train computes the Child-Tuning_D mask from the training data "
                      "without noise, which the reported ε does not cover",
                      "use child.fisher_source: dp with child.fisher_epsilon, or public with child.public_data"),
}


class UnaccountedSetting(ValueError):
    """A DP setting whose ε would not hold, refused (``train.allow_unaccounted`` overrides)."""


def unaccounted(*, sampling: str, verify_engine: bool, mask_source: str | None) -> list[str]:
    """The keys of :data:`ALTERNATIVES` that a DP run with these settings has."""
    out = []
    if sampling != "poisson":
        out.append("sampling")
    if not verify_engine:
        out.append("verify_engine")
    if mask_source == "train":
        out.append("fisher_source")
    return out


def check(private: bool, allow: bool, where: str = "", **settings) -> list[str]:
    """The unaccounted settings of a run (empty when its ε holds). Raises :class:`UnaccountedSetting`
    for a DP run that has any, unless ``allow``; a non-private run has none (it claims no ε)."""
    if not private:
        return []
    keys = unaccounted(**settings)
    if keys and not allow:
        lines = [f"{ALTERNATIVES[k][0]}: {ALTERNATIVES[k][1]}" for k in keys]
        raise UnaccountedSetting((f"{where}: " if where else "") + "; ".join(lines)
                                 + ". To run it anyway, with the run marked guarantee_holds: false, "
                                   "set train.allow_unaccounted: true")
    return keys
