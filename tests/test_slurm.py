"""The SLURM profile run for real: part of the tiny preset through sbatch on a one-node cluster.

Start the cluster with `bash scripts/slurm-cluster.sh start` (.ci/run does); without one answering
`sinfo`, the test is skipped. Data and model preparation, the DP Fisher mask of Child-Tuning_D, two DP
training runs (vanilla and ct_d, ε = 8) and their evaluations: 8 jobs, about 1.5 minutes on two
busy cores (the plugin's first status check after 5 s here instead of its default 40 s).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import copy_workflow

RUN = "results/xu2021/cola/tiny-bert/{method}/eps~8/seed~0"
TARGETS = [f"{RUN.format(method=m)}/metrics.json" for m in ("vanilla", "ct_d")]
EXPECTED = {"prepare_data": 2, "prepare_model": 1, "fisher_mask": 1, "train": 2, "evaluate": 2}
GPU_RULES = {"fisher_mask", "train", "evaluate"}
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: .*/rule_(\w+)/")


def _slurm(*args, timeout=10):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _cluster():
    """None when a cluster answers sinfo with the profile's partitions, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM client tools (bash scripts/slurm-cluster.sh start)"
    try:
        out = _slurm("sinfo", "-h", "-o", "%P")
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s (controller down?)"
    if out.returncode != 0:
        return f"no SLURM cluster answers sinfo: {out.stderr.strip()[-200:]}"
    partitions = {p.rstrip("*") for p in out.stdout.split()}
    if not {"cpu", "gpu"} <= partitions:
        return f"the cluster lacks profiles/slurm's partitions cpu and gpu (has {sorted(partitions)})"
    return None


_WHY_NOT = _cluster()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def _job_record(jobid):
    """`scontrol -d show job` as key=value pairs (kept by slurmctld MinJobAge seconds after the end)."""
    out = _slurm("scontrol", "-d", "-o", "show", "job", jobid)
    assert out.returncode == 0, f"SLURM job {jobid} unknown to scontrol: {out.stderr}"
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def test_the_slurm_profile_runs_every_job_through_sbatch(tmp_path, data_dir):
    work = copy_workflow(tmp_path)
    env = {**os.environ, "PRIVTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PRIVTUNE_OFFLINE": "1"}
    # gpu=1: training, evaluation and the Fisher mask ask for a GPU (the cluster's are fake: jobs get
    # CUDA_VISIBLE_DEVICES, torch finds no CUDA and runs on the CPU)
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml",
           "--config", "gpu=1", "--retries", "0", "--slurm-init-seconds-before-status-checks", "5", *TARGETS]
    try:
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=480)
    except subprocess.TimeoutExpired as e:  # killed: cancel what it left queued or running
        log = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        run_id = re.search(r"SLURM run ID: (\S+)", log)
        if run_id:
            _slurm("scancel", "--name", run_id.group(1))
        pytest.fail(f"the SLURM run did not finish within 8 minutes:\n{log[-3000:]}")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]

    # every job of the DAG was submitted with sbatch, once
    submitted = SUBMITTED.findall(log)
    by_rule = {}
    for _, _, rule in submitted:
        by_rule[rule] = by_rule.get(rule, 0) + 1
    assert by_rule == EXPECTED, log[-4000:]
    stats = re.search(r"^total\s+(\d+)$", log, re.M)
    assert stats and int(stats.group(1)) == len(submitted) == sum(EXPECTED.values())
    assert "Falling back to 'sacct'" not in log  # the profile's squeue status command held

    # each ran in its partition; the GPU rules were allocated one GPU (gres), the others none
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    for _, jobid, rule in submitted:
        rec = _job_record(jobid)
        assert rec["JobName"] == run_id and rec["JobState"] == "COMPLETED", rec
        if rule in GPU_RULES:
            assert rec["Partition"] == "gpu" and rec.get("JOB_GRES") == "gpu:1", (rule, rec)
            assert rec.get("TresPerJob") == "gres:gpu:1", (rule, rec)
        else:
            assert rec["Partition"] == "cpu" and rec.get("JOB_GRES") in (None, "(null)"), (rule, rec)

    # the outputs, and the runs trained on the CPU beside their fake GPU
    for method in ("vanilla", "ct_d"):
        run = work / RUN.format(method=method)
        metrics = json.loads((run / "metrics.json").read_text())
        assert {"mcc", "accuracy"} <= set(metrics["metrics"])
        train = json.loads((run / "train_metrics.json").read_text())
        assert train["device"] == "cpu"
        assert 7.5 < json.loads((run / "privacy.json").read_text())["epsilon"] <= 8.0
    assert list(work.glob("results/fisher/cola/tiny-bert/dp-eps1/pd~0.3/seed~0/mask.pt"))


def test_a_gpu_job_sees_its_fake_gpu_and_torch_runs_on_the_cpu(tmp_path):
    """What the training jobs above meet: SLURM sets CUDA_VISIBLE_DEVICES, CUDA is not there."""
    code = ("import os, torch; x = torch.ones(2, 2) @ torch.ones(2, 2); "
            "print(os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.is_available(), float(x.sum()))")
    out = _slurm("sbatch", "--wait", "--parsable", "-p", "gpu", "--gpus=1", "-c", "1", "--mem", "1000",
                 "-t", "5", "-o", str(tmp_path / "probe.out"), "-D", str(tmp_path),
                 "--wrap", f"{sys.executable} -c \"{code}\"", timeout=180)
    assert out.returncode == 0, out.stderr + (tmp_path / "probe.out").read_text()
    visible, cuda, total = (tmp_path / "probe.out").read_text().split()[-3:]
    assert visible in {"0", "1"} and float(total) == 8.0
    if not shutil.which("nvidia-smi"):
        assert cuda == "False"
