"""What a finished training run writes: the model folder, its training log and metrics, the
diagnostics a DP run writes only when asked, and ``privacy.json`` last (its presence means the run
finished); and the outputs of a zero-shot run, which reads no training data."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from privtune.dp.audit import noise_check
from privtune.dp.plan import privacy_record, versions
from privtune.io import atomic_dir, write_json
from privtune.models import methods
from privtune.training.settings import RunSettings

DIAGNOSTICS = "diagnostics_nonprivate.json"  # a DP run's data statistics, written only with train.diagnostics


def write_outputs(job, state, out_dir: Path, mask_file, train_file, elapsed: float) -> dict:
    """model/, train_log.json, train_metrics.json (and the diagnostics when asked), privacy.json last, from the
    run's :class:`~privtune.training.loop.RunState`."""
    s, plan = job.s, job.plan
    total = methods.count_parameters(job.model)[1]
    with atomic_dir(out_dir / "model") as tmp:
        methods.save_trained(job.model, s.method, tmp)
        job.obj.save(job.model, tmp)
        job.tok.save_pretrained(tmp)
    report = privacy_record(plan, s, mask_file, state.skipped, job.mask_info, train_file)
    params = int(sum(p.numel() for p in job.params))
    noise = float(np.mean(state.noise_norms)) if plan.private else 0.0  # drawn: released only as a check
    if plan.private:
        report["noise_check"] = noise_check(plan.noise_multiplier, s.clip_norm, params, plan.batch_size,
                                            plan.steps, noise)
    train_metrics = {
        "steps": plan.steps, "seconds": elapsed, "seconds_per_step": elapsed / plan.steps,
        "trainable_parameters": params, "total_parameters": total,
        "method": s.method, "objective_family": job.obj.family, "device": str(job.device), "world_size": job.world,
        "settings": asdict(s), "skipped_steps": state.skipped, "segments": state.segments,
        # the norm of each averaged update's noise as σ implies it, σ·C·√d/B: the settings' number, not the
        # drawn one (privtune.dp.audit.noise_check; the drawn mean is among the diagnostics)
        "noise_norm_expected": report["noise_check"]["expected_norm"] if plan.private else 0.0,
        "guarantee_holds": not plan.unaccounted,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated() if job.device.type == "cuda" else None),
        # the last batch's mean loss: a statistic of the training data, so absent under DP
        **({} if plan.private else {"final_loss": state.log[-1]["loss"]}),
    }
    write_json(out_dir / "train_log.json", state.log)
    write_json(out_dir / "train_metrics.json", train_metrics)
    if plan.private and s.diagnostics:
        grads = float(np.mean(state.grad_norms))
        write_json(out_dir / DIAGNOSTICS, {
            "warning": "statistics of the training data that the run's ε does NOT cover: do not release",
            "steps": state.diagnostics, "final_loss": state.diagnostics[-1]["loss"],
            "gradient_norm_mean": grads, "noise_norm_mean": noise,  # the noise drawn: ε does not cover it either
            # ‖noise‖ / ‖clipped gradient‖ of the averaged update, mean over steps: grows with the dimension
            "noise_to_signal": noise / max(1e-12, grads)})
    write_json(out_dir / "privacy.json", report)  # last: its presence means the run finished
    return {"privacy": report, "train": train_metrics}


def zero_shot(s: RunSettings, model, tok, out_dir: Path, family: str | None) -> dict:
    """The untrained model with the run's objective: no training data is read, so ε = 0."""
    if s.objective == "head" and s.kind != "table2text":
        raise ValueError("train.zero_shot with objective: head would evaluate a randomly initialised "
                         "classification head; zero-shot rows need objective: prompt (or a table-to-text task)")
    with atomic_dir(out_dir / "model") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    total = methods.count_parameters(model)[1]
    report = {"epsilon": 0.0, "delta": 0.0, "private": False, "zero_shot": True, "target_epsilon": None,
              "steps": 0, "dataset_size": 0, "noise_multiplier": 0.0, "seed": s.seed,
              "guarantee": "no training example was read: the released model is the prepared model (ε = 0)",
              "guarantee_holds": True, "covers": "everything: no training data was read",
              "warnings": [], "versions": versions()}
    train_metrics = {"steps": 0, "final_loss": None, "seconds": 0.0, "seconds_per_step": 0.0,
                     "trainable_parameters": 0, "total_parameters": total, "method": s.method,
                     "objective_family": family, "device": "none", "world_size": 1, "settings": asdict(s),
                     "skipped_steps": [], "segments": [], "guarantee_holds": True}
    write_json(out_dir / "train_log.json", [])
    write_json(out_dir / "train_metrics.json", train_metrics)
    write_json(out_dir / "privacy.json", report)
    return {"privacy": report, "train": train_metrics}
