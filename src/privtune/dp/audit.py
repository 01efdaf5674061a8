"""Audit of each DP run's guarantee against its inputs, its log and an independent accountant.

Each DP run's ``privacy.json`` records what its guarantee is derived from: the mechanisms composed
(σ, sampling rate, steps of each), δ, the dataset and batch sizes, the training file (path and
SHA-256). The audit checks that record against what the run actually did and read, and fails it
on any mismatch or any mechanism its ε does not cover:

* the data: the training file still hashes as recorded and holds ``dataset_size`` examples;
* the steps: ``train_log.json`` has exactly steps 0 … T−1 for the T accounted;
* the sampler: Poisson subsampling (what the accountant assumes), and nothing marked unaccounted;
* the mask: a Child-Tuning_D run names its mask; a noiseless one is uncovered; a DP one has its
  release among the composed events;
* the record: its fields agree with each other and with the training event;
* ε: re-derived with :func:`privtune.dp.accounting.epsilon` (the RDP accountant σ was calibrated
  with), and not below dp-accounting's PLD accountant, the one accountant not already inside the
  reported maximum.

    python -m privtune.dp.audit results/ [--out results/privacy_audit.json]

exits 1 if any run fails; the ``privacy_audit`` rule runs it on every run.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

from privtune.io import file_sha256, output_file, read_json, read_jsonl, write_json
from privtune.dp import accounting

RTOL = 1e-9
TARGET_TOLERANCE = 0.01  # the reported ε may exceed its target by this fraction (σ's calibration tolerance)
NOISE_TOLERANCE = 0.01  # the recorded noise norm against σ·C·√d/B, before the sampling term below


def independent_epsilons(events: list[accounting.GaussianEvent], delta: float) -> dict[str, float]:
    """ε of ``events`` under dp-accounting's PLD accountant (the RDP ones, Opacus's and
    dp-accounting's, are already inside the reported maximum)."""
    return {"dp_accounting_pld": accounting.epsilon(events, delta, "dpa_pld")}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def audit_report(report: dict) -> dict:
    """``{"ok", "reported", "independent", "problems"}`` for one privacy report (a dict) on its own:
    its fields against each other and its ε against the accountants."""
    if not report.get("private"):
        return {"ok": True, "private": False, "problems": []}
    problems = []
    events, delta, n = report["events"], report["delta"], report["dataset_size"]
    training = [e for e in events if e.get("label") == "training"]
    if len(training) != 1:
        problems.append(f"expected one training event, found {len(training)}")
    else:
        t = training[0]
        for key, field in (("noise_multiplier", "noise_multiplier"), ("sample_rate", "sample_rate"),
                           ("steps", "steps")):
            if not _close(float(t[field]), float(report[key])):
                problems.append(f"{key} = {report[key]} but the training event records {t[field]}")
    if not _close(report["sample_rate"], report["expected_batch_size"] / n):
        problems.append(f"sample_rate {report['sample_rate']} ≠ expected_batch_size / dataset_size "
                        f"= {report['expected_batch_size']}/{n}")
    if not delta < 1 / n:
        problems.append(f"δ = {delta} is not below 1/n = {1 / n:.3g}")
    composed = [accounting.GaussianEvent(**e) for e in events]
    rdp = accounting.epsilon(composed, delta, "rdp")
    if report["epsilon"] < rdp * (1 - RTOL):
        problems.append(f"reported ε = {report['epsilon']:.6g} is below the RDP accountant's {rdp:.6g} "
                        "re-derived from the recorded events")
    independent = independent_epsilons(composed, delta)
    worst = max(independent.values())
    if report["epsilon"] < worst * (1 - RTOL):
        problems.append(f"reported ε = {report['epsilon']:.6g} is below the independent accountant's {worst:.6g}")
    target = report.get("target_epsilon")
    if target is not None and report["epsilon"] > target * (1 + TARGET_TOLERANCE):
        problems.append(f"reported ε = {report['epsilon']:.6g} exceeds the target ε = {target:g} by more than "
                        f"{TARGET_TOLERANCE:.0%}: σ was not calibrated to the target")
    return {"ok": not problems, "private": True, "reported": report["epsilon"], "rederived_rdp": rdp,
            "independent": independent, "problems": problems}


@functools.lru_cache(maxsize=64)
def _file_facts(name: str, kind: str, _stat: tuple) -> tuple[str, int]:
    """(SHA-256, training examples) of a training file, read once however many runs name it;
    ``_stat`` (size, mtime) makes a file changed since the last read be read again."""
    from privtune.objectives.head import training_size

    return file_sha256(Path(name)), training_size(read_jsonl(Path(name)), kind)


def _check_data(report: dict, kind: str | None) -> list[str]:
    name = report.get("train_file")
    if not name:
        return ["privacy.json names no training file (train_file): the dataset size cannot be checked"]
    path = Path(name)
    if not path.exists():
        return [f"the training file {name} is missing: the dataset size cannot be checked (run the audit "
                "from the folder the run was made in)"]
    st = path.stat()
    sha, n = _file_facts(str(path), kind or "classification", (st.st_size, st.st_mtime_ns))
    problems = []
    if report.get("train_file_sha256") != sha:
        problems.append(f"the training file {name} changed since training (SHA-256 differs from the record)")
    if n != report["dataset_size"]:
        problems.append(f"dataset_size = {report['dataset_size']} but {name} holds {n} training examples")
    return problems


def _check_log(report: dict, run_dir: Path) -> list[str]:
    log = run_dir / "train_log.json"
    if not log.exists():
        return [f"{log} is missing: the steps taken cannot be checked"]
    steps = [e.get("step") for e in read_json(log)]
    if steps != list(range(report["steps"])):
        return [f"{log} records {len(steps)} steps but privacy.json accounts {report['steps']} "
                "(steps 0 … T−1 expected, each once)"]
    return []


@functools.lru_cache(maxsize=64)
def _mask_facts(name: str, _stat: tuple) -> tuple[str, list]:
    """(SHA-256, privacy events) of a Child-Tuning_D mask file, read once however many runs name it
    (``_stat`` as in :func:`_file_facts`)."""
    import torch

    return file_sha256(Path(name)), torch.load(name, map_location="cpu", weights_only=False).get("privacy_events", [])


def _check_mask_file(mask: dict, events: list[dict]) -> list[str]:
    """The Child-Tuning_D mask file is the one the run used (its SHA-256), and every privacy event it
    carries is among the events the run composed into its ε."""
    path = Path(mask.get("file", ""))
    if not path.exists():
        return [f"the Child-Tuning_D mask {path} is missing: its hash and events cannot be checked"]
    st = path.stat()
    sha, carried = _mask_facts(str(path), (st.st_size, st.st_mtime_ns))
    if mask.get("sha256") and sha != mask["sha256"]:
        return [f"the Child-Tuning_D mask {path} changed since training (SHA-256 differs from the record)"]
    missing = [e for e in carried if e not in events]
    return [f"the Child-Tuning_D mask {path} carries privacy events the run did not compose: {missing}"] if missing \
        else []


def _check_mechanisms(report: dict, settings: dict) -> list[str]:
    problems = []
    if report.get("sampling") != "poisson":
        problems.append(f"batches were drawn by sampling: {report.get('sampling')}, but ε is accounted for "
                        "Poisson subsampling")
    if report.get("guarantee_holds") is False or report.get("unaccounted"):
        problems.append(f"the run used settings its ε does not cover: {report.get('unaccounted')} "
                        "(train.allow_unaccounted)")
    mask = report.get("fisher_mask")
    if settings.get("child") == "ct_d" and not mask:
        problems.append("a Child-Tuning_D run whose privacy.json names no Fisher mask: the mask is uncovered")
    if mask:
        if mask.get("source") == "train":
            problems.append(f"the Child-Tuning_D mask {mask.get('file')} was computed from the training data "
                            "without noise: no recorded event covers it")
        elif mask.get("source") == "dp" and not any(e.get("label") == "dp_fisher" for e in report["events"]):
            problems.append(f"the DP Fisher mask {mask.get('file')} has no dp_fisher event among the composed ones")
        problems += _check_mask_file(mask, report["events"])
    return problems


def expected_noise_norm(noise_multiplier: float, clip_norm: float, parameters: int, expected_batch_size: float
                        ) -> float:
    """σ·C·√d/B: the norm of N(0, σ²C²I_d)/B, each averaged update's noise, up to a relative spread of
    about 1/√(2d)."""
    return noise_multiplier * clip_norm * math.sqrt(parameters) / expected_batch_size


def noise_check(noise_multiplier: float, clip_norm: float, parameters: int, expected_batch_size: float,
                steps: int, drawn: float) -> dict:
    """The noise a run drew (``drawn``: the norm of each averaged update's noise, mean over steps) against what
    σ implies: N(0, σ²C²I_d)/B has norm σ·C·√d/B up to a relative spread of about 1/√(2d) per step. The run
    records this in ``privacy.json`` and never the drawn norm itself (a statistic of the secret noise that ε
    does not cover: with it, one released noisy sum would tell neighbouring batches apart)."""
    expected = expected_noise_norm(noise_multiplier, clip_norm, parameters, expected_batch_size)
    tol = max(NOISE_TOLERANCE, 5 / math.sqrt(2 * parameters * max(1, steps)))
    return {"expected_norm": expected, "relative_tolerance": tol,
            "holds": bool(math.isclose(drawn, expected, rel_tol=tol))}


def _check_noise(report: dict, metrics_file: Path) -> list[str]:
    """The run's own check of the noise it drew (:func:`noise_check`), and its expected norm against σ·C·√d/B
    from the released settings."""
    check = report.get("noise_check")
    if check is None:
        return ["privacy.json records no check of the noise drawn against the noise accounted"]
    if not check.get("holds"):
        return [f"the noise the run drew is not σ·C·√d/B = {check.get('expected_norm', float('nan')):.6g} within "
                f"{check.get('relative_tolerance', 0):.1%}: the noise added is not the noise accounted"]
    m = read_json(metrics_file) if metrics_file.exists() else {}
    d, c = m.get("trainable_parameters"), (m.get("settings") or {}).get("clip_norm")
    if not d or c is None:
        return [f"{metrics_file} records no parameter count or clipping norm: the noise check cannot be re-derived"]
    expected = expected_noise_norm(report["noise_multiplier"], c, d, report["expected_batch_size"])
    if not math.isclose(check.get("expected_norm", -1.0), expected, rel_tol=RTOL):
        return [f"the noise check's expected norm {check.get('expected_norm')} is not σ·C·√d/B = {expected:.6g} "
                "from the run's released settings"]
    return []


def audit_run(privacy_file: Path) -> dict:
    """:func:`audit_report` of a run's ``privacy.json``, plus its checks against the run's inputs (the
    training file), its log and the mechanisms it used."""
    privacy_file = Path(privacy_file)
    report = read_json(privacy_file)
    result = audit_report(report)
    if not report.get("private"):
        return result
    metrics_file = privacy_file.parent / "train_metrics.json"
    settings = read_json(metrics_file).get("settings", {}) if metrics_file.exists() else {}
    result["problems"] += (_check_data(report, settings.get("kind")) + _check_log(report, privacy_file.parent)
                           + _check_mechanisms(report, settings) + _check_noise(report, metrics_file))
    result["ok"] = not result["problems"]
    return result


def audit_tree(root: Path) -> dict[str, dict]:
    """Audit every ``privacy.json`` under ``root``."""
    return {str(p): audit_run(p) for p in sorted(Path(root).rglob("privacy.json"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m privtune.dp.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="privacy.json files, or folders searched for them")
    ap.add_argument("--out", type=output_file("audit.json"),
                    help="write the audit as JSON here (only if every report passes)")
    a = ap.parse_args(argv)
    results = {}
    for p in a.paths:
        results.update(audit_tree(p) if p.is_dir() else {str(p): audit_run(p)})
    failed = {p: r for p, r in results.items() if not r["ok"]}
    private = sum(r["private"] for r in results.values())
    print(f"audited {len(results)} runs ({private} DP): {len(failed)} failed")
    for p, r in failed.items():
        print(f"FAILED {p}:\n  " + "\n  ".join(r["problems"]), file=sys.stderr)
    if failed:
        return 1
    if a.out:
        write_json(a.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
