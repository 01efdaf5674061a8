"""The claims report (results/claims.md): the tables and per-example predictions read, the verdicts of
:mod:`privtune.report.claims` computed on them, and the markdown written, with the spread over seeds and
each run against the zero-shot model beside them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from privtune.io import read_json, write_atomic
from privtune.report import evidence
from privtune.report.claims import (KEY, UNTESTABLE, Claim, Verdict, _label, _mean, accounted, evaluate_claims,
                                    headline, unaccounted_runs)
from privtune.report.evidence import RunPredictions


def load_tables(csv_paths) -> pd.DataFrame:
    frames = []
    for p in csv_paths:
        f = pd.read_csv(p, dtype={"eps": str, "variant": str}, keep_default_na=False,
                        na_values={k: [""] for k in ("ours", "batch_size", "lr", "clip_norm", "noise_multiplier",
                                                     "train_batch_size", "dataset_size", "trainable_parameters")})
        frames.append(f.assign(paper=Path(p).stem))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_predictions(paths) -> dict[tuple, RunPredictions]:
    """Per-example predictions (the evaluation stage's ``predictions.json``) by run identity (:data:`KEY`)."""
    out = {}
    for p in paths:
        d = read_json(p)
        out[tuple(str(d["run"][k]) for k in KEY)] = RunPredictions(d["task"], d["predictions"], d["labels"])
    return out


def seed_spread(df: pd.DataFrame) -> list[str]:
    """Each group of runs that differs only in its seed: mean, minimum and maximum of the headline metric."""
    df = headline(df)
    lines = []
    for (task, model, method, variant, eps, obj), g in df.groupby(["task", "model", "method", "variant", "eps",
                                                                   "objective"]):
        if len(g) > 1:
            lines.append(f"{_label(task, model, method, eps, obj, variant)}: mean {_mean(g):.2f} over {len(g)} seeds, "
                         f"range {g.ours.min():.2f}–{g.ours.max():.2f}")
    return lines


def against_zero_shot(df: pd.DataFrame) -> list[str]:
    """Each trained run beside the zero-shot row of the same task, model and objective: what training adds
    (no verdict: the zero-shot model is our reference, not a finding of the papers)."""
    df = headline(df)
    lines = []
    zero = df[df.method == "zeroshot"]
    for (task, model, obj), z in zero.groupby(["task", "model", "objective"]):
        runs = df[(df.task == task) & (df.model == model) & (df.objective == obj) & (df.method != "zeroshot")
                  & ~df.variant.str.contains("bs~")]
        for (method, variant, eps), g in runs.groupby(["method", "variant", "eps"]):
            lines.append(f"{_label(task, model, method, eps, obj, variant)}: {_mean(g):.2f}, zero-shot {_mean(z):.2f} "
                         f"({_mean(g) - _mean(z):+.2f})")
    return lines


def render(results: list[tuple[Claim, Verdict]], preset: str = "", zero_shot: list[str] = (),
           left_out: list[str] = (), spread: list[str] = ()) -> str:
    lines = ["# Claims of the two papers, tested on this preset's runs", "",
             f"Preset: **{preset or 'custom'}**. Each verdict is computed from the tables in results/tables/ and the "
             "runs' per-example predictions by the rule shown (privtune.report.claims); none is written by hand. "
             "Numbers are each task's headline metric (accuracy or MCC in percent, BLEU 0-100), mean over seeds.", "",
             f"Method: every comparison is a difference of group means with its {int(evidence.LEVEL * 100)} % interval "
             "from a paired two-level bootstrap (seeds drawn with replacement within each group, then the evaluation "
             f"examples, the same draw for both groups; {evidence.REPLICATES} replicates, {evidence.SLOW_REPLICATES} "
             "for generation metrics; privtune.report.evidence). A rule holds when the whole interval lies on its "
             "side of the threshold, does not hold when the whole interval lies on the other side, and is "
             "inconclusive otherwise. A comparison whose runs did not move beyond the no-learning reference (the "
             "zero-shot model, or the constant majority prediction for a new head) by more than their interval "
             "is not testable. With one seed an interval covers the evaluation sample only.", "",
             "| claim | paper | verdict |", "|---|---|---|"]
    lines += [f"| ({c.key}) {c.statement} | {c.paper} | **{v.verdict}** |" for c, v in results]
    if left_out:
        lines += ["", "Left out of every verdict: runs whose ε does not hold (guarantee_holds false, allowed by "
                      "train.allow_unaccounted): " + "; ".join(left_out) + "."]
    for c, v in results:
        lines += ["", f"## ({c.key}) {c.statement}", "", f"*Paper:* {c.paper}. *Rule:* {c.rule}.", "",
                  f"**Verdict: {v.verdict}.**", ""]
        lines += [f"- {n}" for n in v.numbers] or ["- (no runs)"]
        if v.why:
            lines += ["", f"{'Missing' if v.verdict == UNTESTABLE else 'Why'}: {v.why}."]
    if spread:
        lines += ["", "## Spread over seeds", "", "Runs that differ only in their seed (the training randomness):",
                  ""] + [f"- {s}" for s in spread]
    if zero_shot:
        lines += ["", "## Reference: each run against the zero-shot model (same objective, no training)", "",
                  "What fine-tuning adds to the untrained model; the zero-shot row reads no training data (ε = 0).",
                  ""] + [f"- {z}" for z in zero_shot]
    return "\n".join(lines) + "\n"


def write_claims(csv_paths, out_md, bench_json=None, preset: str = "", prediction_files=()
                 ) -> list[tuple[Claim, Verdict]]:
    bench = read_json(bench_json) if bench_json and Path(bench_json).exists() else None
    df = load_tables(csv_paths)
    results = evaluate_claims(df, bench, load_predictions(prediction_files))
    write_atomic(out_md, render(results, preset, against_zero_shot(accounted(df)), unaccounted_runs(df),
                                seed_spread(accounted(df))))
    return results
