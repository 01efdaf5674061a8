"""Privacy audits: an independent accountant re-derives every quick-preset DP run's ε, and a
membership-inference canary shows the attack advantage stays within what ε allows."""
import copy
import json
import math
import shutil
from dataclasses import asdict
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import beta
from snakemake.utils import validate
from torch import nn

from conftest import ROOT
from privtune.data.readers import read_split
from privtune.dp import accounting, sampling
from privtune.dp.accounting import default_delta
from privtune.dp.audit import audit_report, audit_run
from privtune.dp.engine import GhostClipEngine
from privtune.dp.noise import privatize_
from privtune.childtuning.fisher import dp_fisher_event
from privtune.io import read_json, write_json, write_jsonl
from privtune.pipeline import expand_runs, fisher_source, run_settings
from privtune.data.prep import subsample
from privtune.objectives.head import training_size
from privtune.dp.plan import plan_privacy, privacy_record
from privtune.training.loop import RunSettings, run


@pytest.mark.parametrize("preset,least", [("config.yaml", 2), ("config/claims.yaml", 10)])
def test_every_preset_dp_run_passes_an_independent_audit(data_dir, preset, least):
    """For each DP run of the quick and claims presets: n from its prepared data, σ as training calibrates
    it, and the ε we would report compared with dp-accounting's RDP and PLD on the recorded numbers."""
    cfg = yaml.safe_load(open(ROOT / preset))
    validate(cfg, str(ROOT / "workflow/schemas/config.schema.yaml"))  # fills defaults
    audited = 0
    for r in expand_runs(cfg):
        if not r.private:
            continue
        ds = cfg["datasets"][r.task]
        records = subsample(read_split(r.task, ds["train_split"], data_dir), ds["train_size"], ds["sample_seed"])
        s = RunSettings(**run_settings(cfg, r))
        n = training_size(records, s.kind)
        child = r.exp(cfg).get("child", {})
        if r.method == "ct_d" and fisher_source(r.exp(cfg)) == "dp":  # the DP Fisher composes in
            delta = default_delta(n) if s.delta == "auto" else s.delta
            s.prior_events = [asdict(dp_fisher_event(child["fisher_epsilon"], delta))]
        record = privacy_record(plan_privacy(s, n), s)
        result = audit_report(record)
        assert result["ok"], (r, result["problems"])
        assert result["reported"] >= max(result["independent"].values())
        assert record["epsilon"] <= s.epsilon * 1.01, (r, record["epsilon_by_accountant"])
        audited += 1
    assert audited >= least  # quick: SST-2 at ε 3 and 8; claims: those, the head, C = 10, top2 and the sweep


@pytest.fixture(scope="module")
def record():
    s = RunSettings(kind="classification", epsilon=3.0, batch_size=50, steps=100)
    return privacy_record(plan_privacy(s, 1000), s)


@pytest.mark.parametrize("tamper,problem", [
    (lambda r: r.update(epsilon=r["epsilon"] / 2), "below the independent accountant"),
    (lambda r: r.update(noise_multiplier=r["noise_multiplier"] * 2), "noise_multiplier"),
    (lambda r: r.update(steps=r["steps"] // 2), "steps"),
    (lambda r: r.update(dataset_size=r["dataset_size"] * 2), "expected_batch_size / dataset_size"),
    (lambda r: r.update(target_epsilon=r["epsilon"] / 1.5), "exceeds the target"),
])
def test_audit_refuses_a_report_that_does_not_add_up(record, tamper, problem):
    assert audit_report(record)["ok"]
    rec = copy.deepcopy(record)
    tamper(rec)
    result = audit_report(rec)
    assert not result["ok"] and any(problem in p for p in result["problems"]), result["problems"]


SST = [{"text_a": t, "text_b": None, "label": i % 2} for i, t in enumerate(
    ["a great film", "dull and slow", "wonderful acting", "a mess", "loved it", "boring", "superb", "awful"] * 4)]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, tiny_models):
    """A finished DP run folder (tiny BERT, 3 steps) and its training file."""
    root = tmp_path_factory.mktemp("audit")
    write_jsonl(root / "train.jsonl", SST)
    s = RunSettings(kind="classification", epsilon=3.0, delta=1e-3, batch_size=8, physical_batch_size=8, steps=3,
                    max_length=32)
    run(s, tiny_models / "bert", root / "train.jsonl", root / "run", progress=False)
    return root


def _copy_run(dp_run, dest):
    shutil.copytree(dp_run, dest)
    rep = read_json(dest / "run/privacy.json")
    rep["train_file"] = str(dest / "train.jsonl")  # the copy's own training file
    write_json(dest / "run/privacy.json", rep)
    return dest


def _append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@pytest.mark.parametrize("tamper,problem", [
    (lambda d: _append(d / "train.jsonl", SST[0]), "changed since training"),
    (lambda d: write_json(d / "run/train_log.json", read_json(d / "run/train_log.json")[:-1]),
     "records 2 steps but privacy.json accounts 3"),
    (lambda d: write_json(d / "run/privacy.json", {**read_json(d / "run/privacy.json"), "sampling": "shuffle"}),
     "sampling: shuffle"),
    (lambda d: write_json(d / "run/privacy.json", {**read_json(d / "run/privacy.json"),
                                                   "fisher_mask": {"file": "m.pt", "source": "train"}}),
     "without noise: no recorded event covers it"),
    (lambda d: write_json(d / "run/privacy.json", {**read_json(d / "run/privacy.json"), "dataset_size": 33,
                                                   "sample_rate": 8 / 33,
                                                   "events": [{**read_json(d / "run/privacy.json")["events"][0],
                                                               "sample_rate": 8 / 33}]}),
     "dataset_size = 33 but"),
    (lambda d: write_json(d / "run/privacy.json", {**read_json(d / "run/privacy.json"), "noise_check": {
        **read_json(d / "run/privacy.json")["noise_check"], "holds": False}}), "is not σ·C·√d/B"),
    (lambda d: write_json(d / "run/train_metrics.json", {**read_json(d / "run/train_metrics.json"),
                                                         "trainable_parameters": 4 * read_json(
                                                             d / "run/train_metrics.json")["trainable_parameters"]}),
     "from the run's released settings"),
    (lambda d: write_json(d / "run/privacy.json", {k: v for k, v in read_json(d / "run/privacy.json").items()
                                                   if k != "noise_check"}), "records no check of the noise"),
])
def test_audit_checks_each_run_against_its_inputs_and_log(dp_run, tmp_path, tamper, problem):
    """Tampered run folders fail, naming what: the record alone (audit_report) would pass them."""
    d = _copy_run(dp_run, tmp_path / "copy")
    assert audit_run(d / "run/privacy.json")["ok"], audit_run(d / "run/privacy.json")["problems"]
    tamper(d)
    result = audit_run(d / "run/privacy.json")
    assert not result["ok"] and any(problem in p for p in result["problems"]), result["problems"]


def test_audit_command_fails_and_writes_nothing_on_a_bad_report(tmp_path, dp_run):
    _copy_run(dp_run, tmp_path / "good")
    _copy_run(dp_run, tmp_path / "bad")
    record = read_json(tmp_path / "bad/run/privacy.json")
    write_json(tmp_path / "bad/run/privacy.json", {**record, "epsilon": record["epsilon"] / 2})
    cmd = [sys.executable, "-m", "privtune.dp.audit", "--out", str(tmp_path / "audit.json")]
    out = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "FAILED" in out.stderr and "bad/run/privacy.json" in out.stderr
    assert not (tmp_path / "audit.json").exists()
    out = subprocess.run([*cmd, str(tmp_path / "good")], capture_output=True, text=True)
    assert out.returncode == 0 and (tmp_path / "audit.json").exists()


def test_results_on_disk_pass_the_audit():
    """Whatever runs this checkout has produced (CI runs the quick preset first) pass the audit."""
    reports = [*(ROOT / "results").glob("*/*/*/*/eps~*/seed~*/privacy.json"),  # a sweep's grid points sit
               *(ROOT / "results").glob("*/*/*/*/*~*/eps~*/seed~*/privacy.json")]  # one folder deeper
    if not reports:
        pytest.skip("no runs under results/ yet (run the quick preset first)")
    out = subprocess.run([sys.executable, "-m", "privtune.dp.audit", *map(str, reports)],
                         capture_output=True, text=True, cwd=ROOT)  # training files are named from there
    assert out.returncode == 0, out.stderr[-3000:]


# ----------------------------------------------------------------------------- canary

V, D, L, N = 64, 16, 5, 64  # vocabulary, width, tokens per example, examples (the canary included)
CANARY = N - 1
B, STEPS, C, LR, DELTA, EPS = 16, 40, 1.0, 0.05, 1e-5, 1.0
TAU = 0.35  # fixed before looking: "member" if the canary's loss is below about half of ln 2
TRIALS = 32


class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        nn.init.normal_(self.emb.weight, std=0.01)
        self.out = nn.Linear(D, 2)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def _data():
    rng = np.random.default_rng(1234)
    X = rng.integers(0, 40, size=(N, L))
    y = ((X < 20).sum(1) >= 3).astype(int)
    X[CANARY], y[CANARY] = np.arange(V - L, V), 1  # tokens no other example has
    return torch.tensor(X), torch.tensor(y)


def _canary_loss(seed: int, member: bool, sigma: float | None) -> float:
    """Train on the data with or without the canary (Poisson sampling at the same q either way:
    add/remove neighbours), DP through the pipeline's engine and noise step when ``sigma``."""
    X, y = _data()
    torch.manual_seed(seed)
    model = BagOfWords()
    engine = GhostClipEngine(model, C) if sigma else None
    params = engine.params if engine else list(model.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator().manual_seed(seed)
    for _, idx in sampling.logical_batches(N, B, STEPS, seed, "poisson"):
        idx = torch.as_tensor(idx if member else idx[idx != CANARY], dtype=torch.long)
        if sigma:
            if len(idx):
                with engine.capture(batch_size=len(idx)):
                    losses = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
                engine.backward(losses)
            privatize_(params, sigma, C, B, gen)
        elif len(idx):
            F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float(F.cross_entropy(model(X[CANARY:]), y[CANARY:]))


def empirical_epsilon(member_losses, other_losses, tau, delta, alpha=0.025) -> float:
    """Lower confidence bound on ε from a loss-threshold attack (Clopper–Pearson bounds at level
    ``alpha`` each): an (ε, δ)-DP mechanism has TPR ≤ e^ε·FPR + δ for every test, and its complement."""
    n1, n0 = len(member_losses), len(other_losses)
    tp = sum(loss < tau for loss in member_losses)
    fp = sum(loss < tau for loss in other_losses)

    def lower(k, n):
        return beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0

    def upper(k, n):
        return beta.ppf(1 - alpha, k + 1, n - k) if k < n else 1.0

    bounds = [0.0]
    for hit_lb, miss_ub in ((lower(tp, n1), upper(fp, n0)), (lower(n0 - fp, n0), upper(n1 - tp, n1))):
        if hit_lb > delta and miss_ub > 0:
            bounds.append(math.log((hit_lb - delta) / miss_ub))
    return max(bounds)


@pytest.fixture(scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_membership_inference_on_a_canary_stays_within_epsilon(single_thread):
    sigma = accounting.calibrate_noise(EPS, DELTA, B / N, STEPS)
    results = {}
    for name, s in (("non-private", None), ("dp", sigma)):
        members = [_canary_loss(1000 + i, True, s) for i in range(TRIALS)]
        others = [_canary_loss(2000 + i, False, s) for i in range(TRIALS)]
        results[name] = empirical_epsilon(members, others, TAU, DELTA)
    # The attack has power: without noise it proves more leakage than ε = 1 would allow ...
    assert results["non-private"] > EPS, results
    # ... and against the DP run it proves no more than the accountant's ε.
    assert results["dp"] <= EPS, results


def test_empirical_epsilon_bound():
    assert empirical_epsilon([0.0] * 32, [1.0] * 32, 0.5, 1e-5) > 2.0  # perfect separation
    assert empirical_epsilon([1.0] * 32, [1.0] * 32, 0.5, 1e-5) == 0.0  # none
    assert empirical_epsilon([0.0] * 16 + [1.0] * 16, [0.0] * 16 + [1.0] * 16, 0.5, 1e-5) == 0.0


def test_the_audit_checks_the_child_tuning_mask_the_run_used(tiny_models, tmp_path):
    """A CT_D run under DP: its mask file's hash and the events it carries are what the run composed."""
    from privtune.childtuning.fisher import compute_mask_file

    write_jsonl(tmp_path / "train.jsonl", SST)
    mask = tmp_path / "mask.pt"
    compute_mask_file(tiny_models / "bert", tmp_path / "train.jsonl", mask, "classification", 2, 0.3, batch_size=8,
                      max_length=32, source="dp", fisher_epsilon=1.0, delta=1e-3)
    s = RunSettings(kind="classification", epsilon=3.0, delta=1e-3, batch_size=8, physical_batch_size=8, steps=2,
                    max_length=32, child="ct_d")
    run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", mask_file=mask, progress=False)
    privacy = tmp_path / "run/privacy.json"
    assert audit_run(privacy)["ok"], audit_run(privacy)["problems"]
    rep = read_json(privacy)
    write_json(privacy, {**rep, "events": [e for e in rep["events"] if e["label"] != "dp_fisher"]})
    assert any("dp_fisher" in p or "did not compose" in p for p in audit_run(privacy)["problems"])
    write_json(privacy, rep)
    _append(mask, {"extra": 1})  # the mask file is not the one trained with
    assert any("changed since training" in p for p in audit_run(privacy)["problems"])
