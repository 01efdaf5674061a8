"""The claims report: each finding of the two papers, our numbers, and a verdict computed
from those numbers by a rule stated here (and printed in the report).

A verdict is one of ``holds``, ``does not hold`` or ``not testable`` (the runs the rule
needs are not in this preset; the report names them). No verdict is written by hand:
each comes from :data:`CLAIMS`' rule applied to the long results tables
(``results/tables/{paper}.csv``) and, for the memory claim, the clipping benchmark.
"Does not hold" is a result: the report gives the numbers and the noise regime behind them.

Numbers are the mean over seeds of each task's headline metric
(the task registry's main metric, :mod:`privtune.tasks`), in the tables' scales (accuracy and MCC in
percent, BLEU on 0-100).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from privtune.io import read_json, write_atomic
from privtune.tasks import TASKS

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable"

# thresholds of the rules, in points of the headline metric (ratios for memory)
DP_GAP = 5.0  # (a) "within a few points" of non-private
SWEEP_MARGIN = 2.0  # (b) small batch & small lr at least this far below the best cell
CLIP_TOLERANCE = 1.0  # (c) small C may be at most this far below the large C
ALIGNED_MARGIN = 1.0  # (d) the aligned objective beats the head by more than this
MEMORY_RATIO = 1.2  # (e) ghost clipping's peak memory at most this times non-private
PARAM_TOLERANCE = 1.0  # (f) full fine-tuning at most this far below LoRA / top2
MOVED = 0.5  # (f) a DP run closer than this to the zero-shot model has not learned: it tests nothing
CHILD_TASKS = ("cola", "rte", "mrpc", "stsb")


@dataclass
class Verdict:
    key: str
    verdict: str
    numbers: list[str] = field(default_factory=list)
    why: str = ""


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str
    statement: str
    rule: str
    test: Callable[[pd.DataFrame, dict | None], Verdict]


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of each task's headline metric, with an ``objective`` column even for old tables."""
    if df.empty:
        return df
    df = df[df.apply(lambda r: r.task in TASKS and TASKS[r.task].main_metric == r.metric, axis=1)].copy()
    for col, default in (("objective", "head"), ("variant", ""), ("clip_norm", math.nan), ("paper", "")):
        if col not in df:
            df[col] = default
    df["variant"] = df["variant"].fillna("").astype(str)
    df["eps"] = df["eps"].astype(str)
    return df


def _mean(g: pd.DataFrame) -> float:
    return float(g.ours.mean()) if len(g) else math.nan


def _label(task, model, method, eps, objective=None, variant="") -> str:
    e = {"inf": "non-private", "0": "zero-shot"}.get(str(eps), f"ε={eps}")
    parts = [task, model, method] + ([f"objective {objective}"] if objective else []) + ([variant] if variant else [])
    return f"{' · '.join(parts)} · {e}"


def _noise_regime(g: pd.DataFrame) -> str:
    """σ·√d / B of a DP run: the noise norm of the averaged update in units of C."""
    r = g.iloc[0]
    try:
        sigma, d, b = float(r.noise_multiplier), float(r.trainable_parameters), float(r.train_batch_size)
        n = int(r.dataset_size)
    except (TypeError, ValueError, AttributeError):
        return ""
    if not (sigma > 0 and d > 0 and b > 0):
        return ""
    return (f"n = {n:,}, expected batch B = {b:g}, σ = {sigma:.3g}, d = {int(d):,} trainable parameters: the noise "
            f"norm of each averaged update is σ·C·√d/B ≈ {sigma * math.sqrt(d) / b:.3g}·C")


def _main(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.variant == ""]


def claim_a(df: pd.DataFrame, bench=None) -> Verdict:
    main = _main(df)
    main = main[main.method == "full"]
    nums, gaps, why = [], [], []
    for (task, model, obj), g in main.groupby(["task", "model", "objective"]):
        base = g[g.eps == "inf"]
        if not len(base):
            continue
        for eps in ("8", "3"):
            dp = g[g.eps == eps]
            if not len(dp):
                continue
            gap = _mean(base) - _mean(dp)
            gaps.append(gap)
            zs = df[(df.task == task) & (df.model == model) & (df.method == "zeroshot") & (df.objective == obj)]
            nums.append(f"{_label(task, model, 'full', eps, obj)}: {_mean(dp):.2f} vs non-private {_mean(base):.2f} "
                        f"(gap {gap:.2f})" + (f"; zero-shot {_mean(zs):.2f}" if len(zs) else ""))
            if gap > DP_GAP:
                why.append(f"{task}/{model} ε={eps}: {_noise_regime(dp)}")
    if not gaps:
        return Verdict("a", UNTESTABLE, why="needs full fine-tuning at ε = 8 or 3 beside a non-private run "
                                            "(same task, model, objective)")
    ok = all(g <= DP_GAP for g in gaps)
    return Verdict("a", HOLDS if ok else FAILS, nums, "" if ok else "; ".join(w for w in why if w))


def claim_b(df: pd.DataFrame, bench=None) -> Verdict:
    grid = df[df.variant.str.contains("bs~") & df.variant.str.contains("lr~") & (df.eps != "inf")]
    nums, results = [], []
    for (task, model, method, eps), g in grid.groupby(["task", "model", "method", "eps"]):
        cells = g.groupby(["batch_size", "lr"]).ours.mean()
        bss, lrs = sorted({b for b, _ in cells.index}), sorted({lr for _, lr in cells.index})
        if len(bss) < 2 or len(lrs) < 2:
            continue
        (best_b, best_lr), best = cells.idxmax(), cells.max()
        small = cells.get((bss[0], lrs[0]), math.nan)
        large_lr = best_lr >= lrs[len(lrs) // 2]
        ok = best_b == bss[-1] and large_lr and best - small >= SWEEP_MARGIN
        results.append(ok)
        nums.append(f"{task} · {model} · {method} · ε={eps}: best cell B = {int(best_b)}, lr = {best_lr:g} "
                    f"({best:.2f}); smallest B and lr (B = {int(bss[0])}, lr = {lrs[0]:g}) {small:.2f}; grid "
                    + ", ".join(f"B{int(b)}/lr{lr:g}: {v:.2f}" for (b, lr), v in cells.items()))
    if not results:
        return Verdict("b", UNTESTABLE, why="needs a DP sweep with at least two batch sizes and two learning rates")
    ok = all(results)
    return Verdict("b", HOLDS if ok else FAILS, nums,
                   "" if ok else "the best cell is not at the largest batch with a large lr, or small batch × "
                                 "small lr is not clearly worse")


def claim_c(df: pd.DataFrame, bench=None) -> Verdict:
    dp = df[(df.eps != "inf") & (df.eps != "0") & df.clip_norm.notna()]
    dp = dp[~(dp.variant.str.contains("bs~") | dp.variant.str.contains("obj~"))]
    nums, results = [], []
    for (task, model, method, eps, obj), g in dp.groupby(["task", "model", "method", "eps", "objective"]):
        by_c = g.groupby("clip_norm").ours.mean()
        if len(by_c) < 2:
            continue
        small, large = by_c.index.min(), by_c.index.max()
        ok = by_c[small] >= by_c[large] - CLIP_TOLERANCE
        results.append(ok)
        nums.append(f"{_label(task, model, method, eps, obj)}: C = {small:g}: {by_c[small]:.2f}, C = {large:g}: "
                    f"{by_c[large]:.2f}")
    if not results:
        return Verdict("c", UNTESTABLE, why="needs DP runs at two clipping norms (sweep: {clip_norm: [...]})")
    ok = all(results)
    return Verdict("c", HOLDS if ok else FAILS, nums, "" if ok else "the small clipping norm is worse")


def claim_d(df: pd.DataFrame, bench=None) -> Verdict:
    dp = df[(df.eps == "8") & (df.method == "full")]
    dp = dp[~dp.variant.str.contains("bs~") & ~dp.variant.str.contains("C~")]
    nums, results = [], []
    for (task, model), g in dp.groupby(["task", "model"]):
        aligned, head = g[g.objective == "prompt"], g[g.objective == "head"]
        if not (len(aligned) and len(head)):
            continue
        diff = _mean(aligned) - _mean(head)
        results.append(diff > ALIGNED_MARGIN)
        nums.append(f"{task} · {model} · full · ε=8: aligned objective {_mean(aligned):.2f}, new head "
                    f"{_mean(head):.2f} (difference {diff:.2f})")
    if not results:
        return Verdict("d", UNTESTABLE, why="needs the prompt and the head objective at ε = 8 on one task and model")
    ok = all(results)
    return Verdict("d", HOLDS if ok else FAILS, nums, "" if ok else "the new head is as good or better")


def claim_e(df: pd.DataFrame, bench=None) -> Verdict:
    if not bench:
        return Verdict("e", UNTESTABLE, why="needs the clipping benchmark (benchmark.in_report, or benchmark_cpu)")
    recs = [r for r in bench.get("records", []) if r.get("method") == "ours_bk" and r.get("memory_ratio")]
    if not recs:
        return Verdict("e", UNTESTABLE, why="the benchmark has no memory ratio for ours_bk")
    nums = [f"{r['shape']} on {bench.get('device')}: peak memory {r['memory_ratio']:.2f}× non-private, time "
            f"{r['time_ratio']:.2f}×" + (f" ({r['time_ratio_interleaved']:.2f}× alternated in one process)"
                                         if r.get("time_ratio_interleaved") else "") for r in recs]
    ok = all(r["memory_ratio"] <= MEMORY_RATIO for r in recs)
    return Verdict("e", HOLDS if ok else FAILS, nums, "" if ok else "peak memory above the threshold on a shape")


def claim_f(df: pd.DataFrame, bench=None) -> Verdict:
    dp = _main(df)
    dp = dp[(dp.eps != "inf") & (dp.eps != "0")]
    nums, results = [], []
    unmoved = []
    for (task, model, eps), g in dp.groupby(["task", "model", "eps"]):
        full = g[g.method == "full"]
        small = {m: _mean(g[g.method == m]) for m in ("lora", "top2", "prefix") if (g.method == m).any()}
        if not (len(full) and small):
            continue
        zs = df[(df.task == task) & (df.model == model) & (df.method == "zeroshot")]
        line = (f"{task} · {model} · ε={eps}: full {_mean(full):.2f}; "
                + ", ".join(f"{m} {v:.2f}" for m, v in small.items())
                + (f"; zero-shot {_mean(zs):.2f}" if len(zs) else ""))
        nums.append(line)
        if len(zs) and all(abs(v - _mean(zs)) < MOVED for v in [_mean(full), *small.values()]):
            unmoved.append(f"{task}/{model} ε={eps}")  # nothing learned: equal because nothing moved
            continue
        best = max(small.values())
        results.append(_mean(full) >= best - PARAM_TOLERANCE)
    if not results:
        why = ("needs full fine-tuning beside LoRA, prefix or top2 under DP" if not unmoved else
               f"every DP run is within {MOVED:g} of the zero-shot model ({', '.join(unmoved)}): none learned, "
               "so their agreement says nothing about the number of trainable parameters")
        return Verdict("f", UNTESTABLE, nums, why)
    ok = all(results)
    return Verdict("f", HOLDS if ok else FAILS, nums,
                   "" if ok else "a method with fewer trainable parameters does better under DP at this scale")


def _child(df: pd.DataFrame):
    """(task, {method: mean}) of the non-private Child-Tuning runs; tasks where every method scored the
    same (all at the majority class, say) are left out: a tie of runs that learned nothing tests nothing."""
    base = _main(df)
    base = base[base.task.isin(CHILD_TASKS) & (base.eps == "inf")]
    for task, g in base.groupby("task"):
        means = {m: _mean(g[g.method == m]) for m in ("vanilla", "ct_f", "ct_d") if (g.method == m).any()}
        yield task, means


def _tied(m: dict) -> bool:
    return len(m) > 1 and max(m.values()) - min(m.values()) < 1e-9


def _child_missing(tied: list[str], what: str) -> str:
    if tied:
        return (f"on {', '.join(tied)} every method scored the same (no method learned beyond a constant "
                "prediction at this preset's size): a tie tests nothing")
    return f"needs {what} non-private on a task of Xu et al."


def _child_claim(key: str, df: pd.DataFrame, need: set, what: str, holds, line, fail_why: str) -> Verdict:
    """A Child-Tuning claim: ``holds(means)`` on every task that ran the methods in ``need``; tasks where
    every method tied are listed but are no test."""
    nums, results, tied = [], [], []
    for task, m in _child(df):
        if not need <= set(m):
            continue
        nums.append(f"{task} non-private: {line(m)}")
        if _tied(m):
            tied.append(task)
            continue
        results.append(holds(m))
    if not results:
        return Verdict(key, UNTESTABLE, nums, _child_missing(tied, what))
    ok = all(results)
    return Verdict(key, HOLDS if ok else FAILS, nums, "" if ok else fail_why)


def claim_g(df: pd.DataFrame, bench=None) -> Verdict:
    return _child_claim("g", df, {"vanilla", "ct_f", "ct_d"}, "vanilla, CT_F and CT_D",
                        lambda m: m["ct_f"] > m["vanilla"] and m["ct_d"] > m["vanilla"],
                        lambda m: f"vanilla {m['vanilla']:.2f}, CT_F {m['ct_f']:.2f}, CT_D {m['ct_d']:.2f}",
                        "a Child-Tuning variant is not above vanilla")


def claim_h(df: pd.DataFrame, bench=None) -> Verdict:
    return _child_claim("h", df, {"ct_f", "ct_d"}, "CT_F and CT_D", lambda m: m["ct_d"] >= m["ct_f"],
                        lambda m: f"CT_F {m['ct_f']:.2f}, CT_D {m['ct_d']:.2f}", "CT_F is above CT_D")


CLAIMS = [
    Claim("a", "li2022", "At ε = 8 (and 3), DP fine-tuning is within a few points of non-private fine-tuning.",
          f"full fine-tuning at ε = 8 and 3 at most {DP_GAP:g} points below non-private (same task, model, "
          "objective), for every such pair", claim_a),
    Claim("b", "li2022", "Under DP the best batch size × learning rate is a large batch with a large lr; small batch "
          "with small lr (non-private style) is much worse.",
          f"in every DP grid the best cell has the largest batch size and an lr at or above the grid's median, and "
          f"the smallest-batch, smallest-lr cell is at least {SWEEP_MARGIN:g} points below it", claim_b),
    Claim("c", "li2022", "A small clipping norm is as good as or better than a large one.",
          f"at equal ε the smallest clipping norm is at most {CLIP_TOLERANCE:g} point below the largest", claim_c),
    Claim("d", "li2022", "An objective aligned with pre-training beats a new classification head under DP.",
          f"at ε = 8 the prompt objective exceeds the head objective by more than {ALIGNED_MARGIN:g} point", claim_d),
    Claim("e", "li2022", "Ghost clipping's memory is close to non-private training.",
          f"book-keeping ghost clipping's peak memory at most {MEMORY_RATIO:g}× non-private on every benchmark shape",
          claim_e),
    Claim("f", "li2022", "Fewer trainable parameters do not by themselves help under DP (full fine-tuning ≥ LoRA, "
          "top2).", f"under DP full fine-tuning at most {PARAM_TOLERANCE:g} point below the best of LoRA, prefix "
          f"and top2 (same task, model, ε); runs all within {MOVED:g} of the zero-shot model are not a test",
          claim_f),
    Claim("g", "xu2021", "Child-Tuning_F and Child-Tuning_D beat vanilla fine-tuning.",
          "non-private, CT_F and CT_D both strictly above vanilla on every task that ran all three (a task where "
          "all three tie is not a test)", claim_g),
    Claim("h", "xu2021", "Child-Tuning_D is at least as good as Child-Tuning_F.",
          "non-private, CT_D ≥ CT_F on every task that ran both (a tie of all methods is not a test)", claim_h),
]


def accounted(df: pd.DataFrame) -> pd.DataFrame:
    """The runs whose ε holds: a run marked ``guarantee_holds`` false (train.allow_unaccounted) tests no
    claim about DP, so no verdict reads it."""
    if df.empty or "guarantee_holds" not in df:
        return df
    keep = df.guarantee_holds.map(lambda v: str(v).strip().lower() not in ("false", "0"))
    return df[keep]


def unaccounted_runs(df: pd.DataFrame) -> list[str]:
    """Labels of the runs :func:`accounted` leaves out."""
    df = headline(df)
    gone = df.drop(accounted(df).index) if not df.empty else df
    return sorted({_label(r.task, r.model, r.method, r.eps, r.objective, r.variant) for r in gone.itertuples()})


def evaluate_claims(df: pd.DataFrame, bench: dict | None = None) -> list[tuple[Claim, Verdict]]:
    df = accounted(headline(df))
    return [(c, c.test(df, bench)) for c in CLAIMS]


def load_tables(csv_paths) -> pd.DataFrame:
    frames = []
    for p in csv_paths:
        f = pd.read_csv(p, dtype={"eps": str, "variant": str}, keep_default_na=False,
                        na_values={k: [""] for k in ("ours", "batch_size", "lr", "clip_norm", "noise_multiplier",
                                                     "train_batch_size", "dataset_size", "trainable_parameters")})
        frames.append(f.assign(paper=Path(p).stem))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
           left_out: list[str] = ()) -> str:
    lines = ["# Claims of the two papers, tested on this preset's runs", "",
             f"Preset: **{preset or 'custom'}**. Each verdict is computed from the tables in results/tables/ by "
             "the rule shown (privtune.report.claims); none is written by hand. Numbers are each task's headline "
             "metric (accuracy or MCC in percent, BLEU 0-100), mean over seeds.", "",
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
    if zero_shot:
        lines += ["", "## Reference: each run against the zero-shot model (same objective, no training)", "",
                  "What fine-tuning adds to the untrained model; the zero-shot row reads no training data (ε = 0).",
                  ""] + [f"- {z}" for z in zero_shot]
    return "\n".join(lines) + "\n"


def write_claims(csv_paths, out_md, bench_json=None, preset: str = "") -> list[tuple[Claim, Verdict]]:
    bench = read_json(bench_json) if bench_json and Path(bench_json).exists() else None
    df = load_tables(csv_paths)
    results = evaluate_claims(df, bench)
    write_atomic(out_md, render(results, preset, against_zero_shot(accounted(df)), unaccounted_runs(df)))
    return results
