"""Nothing lost: killed runs resume exactly, failed runs leave no finished-looking output,
non-finite losses stop (or are skipped and still counted), bad input is refused up front."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import copy_workflow
from privtune.training import checkpoint
from privtune.training import loop as train
from privtune.dp import sampling
from privtune.dp.audit import audit_report
from privtune.io import atomic_dir, atomic_path, read_json, write_json, write_jsonl
from privtune.training.loop import DIAGNOSTICS, NonFiniteError, RunSettings, run

SST = [{"text_a": t, "text_b": None, "label": i % 2} for i, t in enumerate(
    ["a great film", "dull and slow", "wonderful acting", "a mess", "loved it", "boring", "superb", "awful"] * 4)]
RUN = "results/li2022/sst2/tiny-bert/full/eps~3/seed~0"


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def one_thread():
    """Runs that set ``threads`` change this process's torch threads: put them back after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- resume


def test_killed_training_job_resumes_under_snakemake(tmp_path, data_dir, one_thread):
    """SIGKILL the training process of a real Snakemake job; the rerun resumes from the last
    checkpoint and ends with the parameters and ε of an uninterrupted run."""
    work = copy_workflow(tmp_path)
    cfg = yaml.safe_load(open(work / "config/tiny.yaml"))
    cfg["experiments"] = [e for e in cfg["experiments"] if e["name"] == "li2022-sst2"]
    cfg["experiments"][0].update(epsilons=[3])
    cfg["experiments"][0]["train"].update(steps=40, checkpoint_every=4)
    (work / "kill.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PRIVTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PRIVTUNE_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", f"{RUN}/privacy.json", "--cores", "1", "--configfile", "kill.yaml"]

    job = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = work / RUN / "checkpoint"
    deadline = time.monotonic() + 300
    while checkpoint.info(ckpt) is None and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    info = checkpoint.info(ckpt)
    assert info is not None, "no checkpoint appeared: " + job.communicate()[0][-3000:]
    os.kill(info["pid"], signal.SIGKILL)  # the training process, not Snakemake
    out = job.communicate(timeout=120)[0]
    assert job.returncode != 0, out[-2000:]
    # Snakemake took the failed job's outputs away; the checkpoint (not an output) stayed
    assert not (work / RUN / "privacy.json").exists() and not (work / RUN / "model").exists()
    step = checkpoint.info(ckpt)["step"]
    assert 4 <= step < 40 and step % 4 == 0

    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (work / f"logs/train/{RUN.removeprefix('results/')}.log").read_text()
    assert f"at step {step} of 40" in log
    metrics = read_json(work / RUN / "train_metrics.json")
    assert metrics["segments"][-1] == {"start": step, "stop": 40}  # finished steps were not repeated
    assert not ckpt.exists()  # cleared once the outputs were written

    settings = RunSettings(**metrics["settings"])
    ref = run(settings, work / "results/models/tiny-bert", work / "results/data/sst2/train.jsonl",
              tmp_path / "uninterrupted", progress=False)
    assert _same_weights(work / RUN, tmp_path / "uninterrupted")
    assert read_json(work / RUN / "privacy.json")["epsilon"] == ref["privacy"]["epsilon"]


class Crash(Exception):
    pass


def _crash_after_checkpoint(monkeypatch, at_step: int):
    real = checkpoint.save

    def save(folder, state, fp, **kw):
        real(folder, state, fp, **kw)
        if state["step"] == at_step:
            raise Crash(f"simulated crash after the checkpoint at step {at_step}")

    monkeypatch.setattr(checkpoint, "save", save)


@pytest.fixture(scope="module")
def sst_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, SST)
    return path


def _dp(**kw):
    return RunSettings(**{"kind": "classification", "epsilon": 3.0, "delta": 1e-3, "batch_size": 8,
                          "physical_batch_size": 4, "steps": 10, "lr": 1e-3, "max_length": 32,
                          "checkpoint_every": 3, **kw})


def test_resume_is_exact_and_only_for_the_same_run(tmp_path, tiny_models, sst_file, monkeypatch, capsys):
    bert = tiny_models / "bert"
    run(_dp(), bert, sst_file, tmp_path / "ref", progress=False)

    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 6)
        with pytest.raises(Crash):
            run(_dp(), bert, sst_file, tmp_path / "a", progress=False)
    assert not (tmp_path / "a/privacy.json").exists() and checkpoint.info(tmp_path / "a/checkpoint")["step"] == 6
    res = run(_dp(), bert, sst_file, tmp_path / "a", progress=False)
    assert res["train"]["segments"] == [{"start": 0, "stop": 6}, {"start": 6, "stop": 10}]
    assert _same_weights(tmp_path / "a", tmp_path / "ref")
    assert len(read_json(tmp_path / "a/train_log.json")) == 10

    # a checkpoint of other settings is not resumed: the run starts again and says why
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 6)
        with pytest.raises(Crash):
            run(_dp(lr=5e-4), bert, sst_file, tmp_path / "b", progress=False)
    capsys.readouterr()
    res = run(_dp(), bert, sst_file, tmp_path / "b", progress=False)
    assert res["train"]["segments"] == [{"start": 0, "stop": 10}]
    assert "belongs to other settings" in capsys.readouterr().out
    assert _same_weights(tmp_path / "b", tmp_path / "ref")

    # an unreadable checkpoint is not trusted either
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 3)
        with pytest.raises(Crash):
            run(_dp(), bert, sst_file, tmp_path / "c", progress=False)
    state = tmp_path / "c/checkpoint" / checkpoint.STATE
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    res = run(_dp(), bert, sst_file, tmp_path / "c", progress=False)
    assert res["train"]["segments"] == [{"start": 0, "stop": 10}]
    assert _same_weights(tmp_path / "c", tmp_path / "ref")


def test_a_stopped_secure_run_says_where_its_secret_root_is_and_resumes_with_it(tmp_path, tiny_models, sst_file,
                                                                                 monkeypatch, capsys):
    """secure_rng: the checkpoint holds the 128-bit root of the noise and the batches. A run that stops says
    so (the file, and what to do); state.json says so too; the resumed run draws from the same root (its
    segments continue) and deletes the checkpoint when it finishes."""
    from privtune.dp import rng

    keys = []  # (root, step) of every noise draw, across the crash and the resume
    real_key = rng.noise_key
    monkeypatch.setattr(rng, "noise_key", lambda root, step: keys.append((root, step)) or real_key(root, step))
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 6)
        with pytest.raises(Crash):
            run(_dp(secure_rng=True), tiny_models / "bert", sst_file, tmp_path / "s", progress=False)
    err = capsys.readouterr().err
    assert str(tmp_path / "s/checkpoint" / checkpoint.STATE) in err and "secret root" in err
    assert "secret root" in checkpoint.info(tmp_path / "s/checkpoint")["secret"]
    root = torch.load(tmp_path / "s/checkpoint" / checkpoint.STATE, weights_only=False)["root"]
    assert root.bit_length() > 64  # 128 bits from the OS (below 2**64 with probability 2**-64)
    assert (tmp_path / "s/checkpoint" / checkpoint.STATE).stat().st_mode & 0o077 == 0  # owner-only
    res = run(_dp(secure_rng=True), tiny_models / "bert", sst_file, tmp_path / "s", progress=False)
    assert res["train"]["segments"] == [{"start": 0, "stop": 6}, {"start": 6, "stop": 10}]
    assert not (tmp_path / "s/checkpoint").exists()
    # the resumed run drew from the checkpoint's root, one key per step, none repeated
    assert [step for _, step in keys] == list(range(10)) and {r for r, _ in keys} == {root}
    # a non-secure run stops without the warning, and its state.json has no secret
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 3)
        with pytest.raises(Crash):
            run(_dp(), tiny_models / "bert", sst_file, tmp_path / "p", progress=False)
    assert "secret root" not in capsys.readouterr().err
    assert "secret" not in checkpoint.info(tmp_path / "p/checkpoint")


# ----------------------------------------------------------------------------- non-finite losses

def _poisoned(tmp_path: Path) -> tuple[Path, int]:
    """STS-B-like regression data with one example whose label is NaN (its loss is NaN)."""
    recs = [{"text_a": r["text_a"], "text_b": None, "label": float(r["label"])} for r in SST]
    bad = 5
    recs[bad]["label"] = float("nan")
    path = tmp_path / "poisoned.jsonl"
    write_jsonl(path, recs)
    return path, bad


def _regression(**kw):
    return _dp(kind="regression", num_labels=1, steps=12, **kw)


def test_nonfinite_loss_stops_naming_the_step_and_writes_no_output(tmp_path, tiny_models):
    """Non-private (under DP no decision reads the loss: the next test)."""
    data, bad = _poisoned(tmp_path)
    s = _regression(epsilon=None)
    first = next(step for step, idx in sampling.logical_batches(len(SST), 8, 12, s.seed, "shuffle") if bad in idx)
    with pytest.raises(NonFiniteError, match=rf"step {first} of 12: loss nan.*on_nonfinite: skip"):
        run(s, tiny_models / "bert", data, tmp_path / "run", progress=False)
    left = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert left <= {"checkpoint"}  # no model, no metrics, no privacy.json


def test_skip_policy_skips_exactly_the_poisoned_updates(tmp_path, tiny_models):
    """Non-private, a NaN example makes its step's gradient NaN: exactly those updates are skipped."""
    data, bad = _poisoned(tmp_path)
    res = run(_regression(on_nonfinite="skip", epsilon=None), tiny_models / "bert", data, tmp_path / "run",
              progress=False)
    poisoned = [step for step, idx in sampling.logical_batches(len(SST), 8, 12, 0, "shuffle") if bad in idx]
    assert poisoned and len(poisoned) < 12
    assert res["train"]["skipped_steps"] == poisoned
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "run").values())
    log = read_json(tmp_path / "run/train_log.json")
    assert [e["step"] for e in log if e.get("skipped")] == poisoned


def test_under_dp_a_poisoned_example_is_dropped_and_its_step_still_applied(tmp_path, tiny_models):
    """Under DP the NaN example gets clip factor 0 (the engine selects it away): every update is the
    clipped sum of the other examples plus noise, finite, so nothing is skipped, and every step counts.
    The default policy (stop) does not stop either: the NaN loss is a statistic of the data that no
    decision of a DP run may read. It shows only in the diagnostics, when asked for."""
    data, bad = _poisoned(tmp_path)
    res = run(_regression(diagnostics=True), tiny_models / "bert", data, tmp_path / "run", progress=False)
    poisoned = [step for step, idx in sampling.logical_batches(len(SST), 8, 12, 0) if bad in idx]
    assert poisoned and len(poisoned) < 12
    rep = read_json(tmp_path / "run/privacy.json")
    assert rep["skipped_steps"] == [] == res["train"]["skipped_steps"]
    assert rep["steps"] == 12 and rep["events"][-1]["steps"] == 12
    assert audit_report(rep)["ok"] and rep["epsilon"] <= 3.0
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "run").values())
    assert "loss" not in read_json(tmp_path / "run/train_log.json")[0]
    diag = read_json(tmp_path / "run" / DIAGNOSTICS)
    assert [e["step"] for e in diag["steps"] if not math.isfinite(e["loss"])] == poisoned  # the loss shows it
    assert "do not release" in diag["warning"] and diag["gradient_norm_mean"] > 0


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite"):
        RunSettings(kind="classification", on_nonfinite="ignore")


# ----------------------------------------------------------------------------- atomic outputs

def test_failed_writes_leave_the_old_output_or_none(tmp_path):
    write_json(tmp_path / "m.json", {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("killed while writing")
    assert read_json(tmp_path / "m.json") == {"ok": 1}
    (tmp_path / "model").mkdir()
    (tmp_path / "model/weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while saving")
    assert (tmp_path / "model/weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "model"]  # no temporaries left


def test_delta_too_large_is_refused_before_training_naming_the_key(tmp_path, tiny_models, sst_file, monkeypatch):
    monkeypatch.setattr(train.GhostClipEngine, "backward", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"train\.delta = 0\.1 is not below 1/n"):
        run(_dp(delta=0.1), tiny_models / "bert", sst_file, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan])
def test_nonpositive_epsilon_is_refused(eps):
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        RunSettings(kind="classification", epsilon=eps)


def test_train_command_line(tmp_path, tiny_models, sst_file):
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"kind": "classification", "steps": 2, "batch_size": 8, "max_length": 32}))
    out = subprocess.run([sys.executable, "-m", "privtune.training.loop", "--settings", str(settings), "--model",
                          str(tiny_models / "bert"), "--train", str(sst_file), "--out", str(tmp_path / "run"),
                          "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["epsilon"] == math.inf
    assert (tmp_path / "run/privacy.json").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_single_non_finite_gradient_entry_is_found(dtype, bad):
    from privtune.training.loop import _all_finite

    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (5, 0, 100_003, 3)]
    for p, n in zip(params, (5, 0, 100_003, 3)):
        p.grad = torch.randn(n).to(dtype)
    params[3].grad = None  # a parameter that got no gradient is not read
    assert _all_finite(params)
    for where in (0, 77_777, 100_002):
        g = params[2].grad.clone()
        g[where] = bad
        params[2].grad, kept = g, params[2].grad
        assert not _all_finite(params)
        params[2].grad = kept
    params[0].grad[4] = bad
    assert not _all_finite(params)
    assert _all_finite([]) and _all_finite(params[1:2])  # nothing to read: nothing non-finite
    if dtype == torch.float64:  # finite beyond float32's range is still finite
        params[0].grad[4] = 1e300
        assert _all_finite(params)


def test_the_progress_bar_asks_the_accountant_at_most_epsilon_shown_times(tmp_path, tiny_models, sst_file,
                                                                          monkeypatch):
    from privtune.dp.plan import PrivacyPlan
    from privtune.training import loop

    asked = []
    real = PrivacyPlan.epsilon_after
    monkeypatch.setattr(PrivacyPlan, "epsilon_after", lambda self, k, *a: asked.append(k) or real(self, k, *a))
    monkeypatch.setattr(loop, "EPSILON_SHOWN", 2)
    run(_dp(steps=5, checkpoint_every=0), tiny_models / "bert", sst_file, tmp_path / "quiet", progress=False)
    assert asked == []  # no bar, no accountant call
    run(_dp(steps=5, checkpoint_every=0), tiny_models / "bert", sst_file, tmp_path / "bar", progress=True)
    assert asked == [2, 4, 5]  # every steps // 2 steps, and the last


@pytest.mark.parametrize("module, args, example", [
    ("privtune.bench.clipping", ["--device", "cpu", "--shapes", "gpt2-2layer"], "clipping.json"),
    ("privtune.bench.batches", ["--model", "m", "--train", "t"], "physical_batches.json"),
    ("privtune.dp.audit", ["results"], "audit.json"),
    ("privtune.report.versus", ["a", "b"], "versus.md"),
    ("privtune.selection", ["--task", "sst2", "--model", "m", "--val-size", "8", "--candidate", "{}"],
     "selection.json"),
])
def test_an_output_file_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, module, args, example):
    """Commands that write their file when their work is done read --out first: a folder there would make
    the final rename fail and lose the work."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: {tmp_path} is a folder" in err and str(tmp_path / example) in err
