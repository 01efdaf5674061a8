"""scripts/gpu-check.sh in its CPU mode: the same steps and benchmark options as on a GPU (every method
in fp32 and bf16 on three shapes, grouped processes, the largest-batch search, a time budget, then the
tiny preset's training run through Snakemake), on tiny shapes, in a few minutes. Slow: `pytest -m slow`."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

METHODS = {"nonprivate", "ours_bk", "ours_ghost", "opacus_hooks", "opacus_ghost_untied"}
SHAPES = {"tiny-small", "tiny-medium", "tiny-large"}


@pytest.mark.slow
def test_gpu_check_passes_in_cpu_mode(tmp_path, data_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "PRIVTUNE_DATA_DIR": str(data_dir), "OUT": ""}
    p = subprocess.run(["bash", str(ROOT / "scripts/gpu-check.sh"), "--device", "cpu", "--out", str(out),
                        "--work", str(work)], capture_output=True, text=True, env=env, timeout=1200)
    log = (out / "gpu-check.log").read_text()
    assert p.returncode == 0, log[-4000:] + p.stderr[-2000:]
    assert "done in" in log and "passed" in log.splitlines()[-1]

    data = json.loads((out / "clipping_cpu.json").read_text())
    recs = {(r["shape"], r["method"], r["precision"]): r for r in data["records"]}
    assert set(recs) == {(s, m, p) for s in SHAPES for m in METHODS for p in ("fp32", "bf16")}
    for key, r in recs.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["time_s"] > 0 and r["parameters"] > 0
        # the largest-batch search ran from the batch of 2 to the CPU mode's limit of 8
        assert r["largest_batch"] == 8 and r["largest_batch_stopped_by"] == "limit", key
        assert r["time_ratio"] > 0  # against the same shape's and precision's non-private step
    small = {m: recs[("tiny-small", m, "fp32")]["parameters"] for m in METHODS}
    assert recs[("tiny-large", "nonprivate", "fp32")]["parameters"] > small["nonprivate"]
    assert data["device"] == "cpu" and data["precisions"] == ["fp32", "bf16"]
    for png in (out / "clipping_cpu.png", out / "clipping_cpu_bf16.png"):  # a figure per precision
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the training run: Snakemake's tiny preset, DP SST-2, on the device asked for
    metrics = json.loads((out / "tiny-train/train_metrics.json").read_text())
    privacy = json.loads((out / "tiny-train/privacy.json").read_text())
    assert metrics["device"] == "cpu" and metrics["guarantee_holds"] is True
    assert privacy["epsilon"] <= 8.0 * 1.0001 and privacy["noise_multiplier"] > 0
    for step in ("benchmark written", "snakemake: tiny preset", "tiny training run done on cpu"):
        assert step in log, step
