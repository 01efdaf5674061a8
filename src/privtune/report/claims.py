"""The claims report: each finding of the two papers, our numbers with their uncertainty, and a verdict
computed from them by a rule stated here (and printed in the report).

Every comparison a claim makes is a difference between two groups of runs (each over its seeds) on
the same evaluation examples, with a 95 % interval from a paired two-level bootstrap (seeds, then
evaluation examples: :mod:`privtune.report.evidence`). A rule says "difference > threshold", and

- **holds**: the whole interval lies above the threshold;
- **does not hold**: the whole interval lies below it;
- **inconclusive**: the interval straddles it (more seeds or evaluation examples would decide);
- **not testable**: the runs are missing, have no per-example predictions, or did not learn: every
  claim that needs learning first checks that the runs it compares moved beyond the no-learning
  reference (the zero-shot model of the same objective, or, for a new head, the constant majority
  prediction) by more than their interval, and names the runs that did not;
- **baseline suspect** (claim a): the non-private baseline is not above zero-shot, or a DP run is
  above it beyond the interval: the baseline, not DP, is then what the numbers measure.

A claim with several comparisons (tasks, ε, models) holds when every testable one holds, does not
hold when one does not, and is inconclusive otherwise. Numbers are each task's headline metric (the
task registry's main metric, :mod:`privtune.tasks`) in the tables' scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from privtune.report import evidence
from privtune.report.evidence import Comparison, RunPredictions
from privtune.tasks import TASKS

HOLDS, FAILS, INCONCLUSIVE, UNTESTABLE, SUSPECT = (
    "holds", "does not hold", "inconclusive", "not testable", "baseline suspect")

# thresholds of the rules, in points of the headline metric (ratios for memory)
DP_GAP = 5.0  # (a) "within a few points" of non-private
SWEEP_MARGIN = 2.0  # (b) small batch & small lr at least this far below the recommended cell
CLIP_TOLERANCE = 1.0  # (c) small C may be at most this far below the large C
ALIGNED_MARGIN = 1.0  # (d) the aligned objective beats the head by more than this
MEMORY_RATIO = 1.2  # (e) ghost clipping's peak memory at most this times non-private
PARAM_TOLERANCE = 1.0  # (f) full fine-tuning at most this far below LoRA / top2
CHILD_TOLERANCE = 1.0  # (h) CT_D at most this far below CT_F
CHILD_TASKS = ("cola", "rte", "mrpc", "stsb")
KEY = evidence.RUN_KEY  # a run's identity in the tables and in each predictions.json


@dataclass
class Test:
    """One comparison of a claim: its outcome and the line the report prints."""

    outcome: str
    line: str


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
    test: Callable[["Evidence", dict | None], Verdict]


class Evidence:
    """The headline rows of the tables with each run's per-example predictions."""

    def __init__(self, df: pd.DataFrame, predictions: dict[tuple, RunPredictions]):
        self.df, self.predictions = df, predictions

    def runs(self, g: pd.DataFrame) -> list[RunPredictions] | None:
        got = [self.predictions.get(tuple(str(getattr(r, k)) for k in KEY)) for r in g.itertuples()]
        return got if got and all(p is not None for p in got) else None

    def compare(self, a: pd.DataFrame, b: pd.DataFrame | list[RunPredictions]) -> Comparison | None:
        ra = self.runs(a)
        rb = b if isinstance(b, list) else self.runs(b)
        if not ra or not rb:
            return None
        return evidence.compare(ra, rb, TASKS[a.iloc[0].task].main_metric)

    def reference(self, g: pd.DataFrame) -> tuple[str, pd.DataFrame | list[RunPredictions]] | None:
        """The no-learning reference of the runs ``g``: the zero-shot runs of the same task, model and
        objective, else (a new head, which starts at random) the constant majority prediction."""
        r = g.iloc[0]
        df = self.df
        zs = df[(df.task == r.task) & (df.model == r.model) & (df.method == "zeroshot") & (df.objective == r.objective)]
        if len(zs):
            return "zero-shot", zs
        runs = self.runs(g.iloc[:1])
        if runs and TASKS[r.task].kind != "table2text":
            return "constant prediction", [evidence.constant_predictions(runs[0])]
        return None

    def learned(self, g: pd.DataFrame, label: str) -> tuple[bool, str]:
        """Whether the runs ``g`` moved beyond their no-learning reference by more than the interval."""
        ref = self.reference(g)
        if ref is None:
            return False, f"{label}: no no-learning reference (zero-shot run or per-example predictions)"
        c = self.compare(g, ref[1])
        if c is None:
            return False, f"{label}: no per-example predictions"
        return c.above(0), f"{label} − {ref[0]}: {c.text()}"


def outcome(c: Comparison, threshold: float) -> str:
    return HOLDS if c.above(threshold) else FAILS if c.below(threshold) else INCONCLUSIVE


def combine(key: str, tests: list[Test], missing: str, fail_why: str = "") -> Verdict:
    """A claim's verdict from its comparisons (module docstring)."""
    lines = [t.line for t in tests]
    decided = [t.outcome for t in tests if t.outcome in (HOLDS, FAILS, INCONCLUSIVE)]
    if not decided:
        if any(t.outcome == SUSPECT for t in tests):
            return Verdict(key, SUSPECT, lines, "the non-private baseline does not support a verdict (see the lines)")
        return Verdict(key, UNTESTABLE, lines, missing)
    if FAILS in decided:
        return Verdict(key, FAILS, lines, fail_why)
    if INCONCLUSIVE in decided:
        return Verdict(key, INCONCLUSIVE, lines, "an interval straddles the rule's threshold: more seeds or "
                                                 "evaluation examples would decide")
    return Verdict(key, HOLDS, lines)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of each task's headline metric, with an ``objective`` column even for old tables."""
    if df.empty:
        return df
    # the papers' tasks only: a user's own dataset (user_tasks:) is in the tables, not in the papers' claims
    df = df[df.apply(lambda r: r.task in TASKS and TASKS[r.task].source is None
                     and TASKS[r.task].main_metric == r.metric, axis=1)].copy()
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


def _pair(ev: Evidence, key: str, a: pd.DataFrame, b: pd.DataFrame, threshold: float, what: str,
          need: dict[str, pd.DataFrame]) -> Test:
    """``a − b > threshold`` once every group in ``need`` ({label: runs}) has learned."""
    not_learned, learned = [], []
    for label, g in need.items():
        ok, line = ev.learned(g, label)
        (learned if ok else not_learned).append(line)
    if not_learned:
        return Test(UNTESTABLE, f"{what}: not testable, did not learn beyond the interval — " + "; ".join(not_learned))
    c = ev.compare(a, b)
    if c is None:
        return Test(UNTESTABLE, f"{what}: no per-example predictions")
    return Test(outcome(c, threshold), f"{what}: {c.a:.2f} vs {c.b:.2f}, {c.text()}; rule: > {threshold:g} → "
                                       f"{outcome(c, threshold)}" + (f". Learned: {'; '.join(learned)}" if learned else ""))


def _main(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.variant == ""]


def claim_a(ev: Evidence, bench=None) -> Verdict:
    main = _main(ev.df)
    main = main[main.method == "full"]
    tests = []
    for (task, model, obj), g in main.groupby(["task", "model", "objective"]):
        base = g[g.eps == "inf"]
        if not len(base):
            continue
        for eps in ("8", "3"):
            dp = g[g.eps == eps]
            if not len(dp):
                continue
            what = f"{_label(task, model, 'full', eps, obj)} − non-private"
            np_ok, np_line = ev.learned(base, "non-private")
            dp_ok, dp_line = ev.learned(dp, f"ε={eps}")
            c = ev.compare(dp, base)
            if c is None:
                tests.append(Test(UNTESTABLE, f"{what}: no per-example predictions"))
            elif not np_ok:
                tests.append(Test(SUSPECT, f"{what}: baseline suspect, the non-private run is not above the "
                                           f"no-learning reference ({np_line})"))
            elif c.above(0):
                tests.append(Test(SUSPECT, f"{what}: baseline suspect, DP is above non-private beyond the "
                                           f"interval ({c.text()})"))
            elif not dp_ok:
                tests.append(Test(UNTESTABLE, f"{what}: not testable, the DP run did not learn ({dp_line})"))
            else:
                o = outcome(c, -DP_GAP)
                tests.append(Test(o, f"{what}: {c.a:.2f} vs {c.b:.2f}, {c.text()}; rule: > {-DP_GAP:g} → {o}"
                                     + (f"; {_noise_regime(dp)}" if o != HOLDS else "")
                                     + f". Both learned: {dp_line}; {np_line}"))
    return combine("a", tests, "needs full fine-tuning at ε = 8 or 3 beside a non-private run (same task, model, "
                               "objective)", "DP is more than the gap below non-private")


def claim_b(ev: Evidence, bench=None) -> Verdict:
    df = ev.df
    grid = df[df.variant.str.contains("bs~") & df.variant.str.contains("lr~") & (df.eps != "inf")]
    tests = []
    for (task, model, method, eps), g in grid.groupby(["task", "model", "method", "eps"]):
        cells = {k: c for k, c in g.groupby(["batch_size", "lr"])}
        bss, lrs = sorted({b for b, _ in cells}), sorted({lr for _, lr in cells})
        if len(bss) < 2 or len(lrs) < 2 or (bss[0], lrs[0]) not in cells:
            continue
        # the paper's recommendation: the largest batch with a large lr (at or above the grid's median)
        rec = [k for k in cells if k[0] == bss[-1] and k[1] >= lrs[len(lrs) // 2]]
        if not rec:
            continue
        best = max(rec, key=lambda k: _mean(cells[k]))
        what = (f"{task} · {model} · {method} · ε={eps}: B = {int(best[0])}, lr = {best[1]:g} − (B = {int(bss[0])}, "
                f"lr = {lrs[0]:g})")
        t = _pair(ev, "b", cells[best], cells[(bss[0], lrs[0])], SWEEP_MARGIN, what, {"recommended cell": cells[best]})
        beaten = [k for k in cells if k not in rec and (c := ev.compare(cells[k], cells[best])) is not None
                  and c.above(0)]
        if beaten and t.outcome != UNTESTABLE:
            t = Test(FAILS, t.line + "; cells above it beyond the interval: "
                     + ", ".join(f"B = {int(b)}, lr = {lr:g}" for b, lr in beaten))
        tests.append(t)
    return combine("b", tests, "needs a DP sweep with at least two batch sizes and two learning rates",
                   "small batch × small lr is not clearly worse, or another cell beats the recommended one")


def claim_c(ev: Evidence, bench=None) -> Verdict:
    df = ev.df
    dp = df[(df.eps != "inf") & (df.eps != "0") & df.clip_norm.notna()]
    dp = dp[~(dp.variant.str.contains("bs~") | dp.variant.str.contains("obj~"))]
    tests = []
    for (task, model, method, eps, obj), g in dp.groupby(["task", "model", "method", "eps", "objective"]):
        norms = sorted(g.clip_norm.unique())
        if len(norms) < 2:
            continue
        small, large = g[g.clip_norm == norms[0]], g[g.clip_norm == norms[-1]]
        tests.append(_pair(ev, "c", small, large, -CLIP_TOLERANCE,
                           f"{_label(task, model, method, eps, obj)}: C = {norms[0]:g} − C = {norms[-1]:g}",
                           {f"C = {norms[0]:g}": small, f"C = {norms[-1]:g}": large}))
    return combine("c", tests, "needs DP runs at two clipping norms (sweep: {clip_norm: [...]})",
                   "the small clipping norm is worse")


def claim_d(ev: Evidence, bench=None) -> Verdict:
    df = ev.df
    dp = df[(df.eps == "8") & (df.method == "full")]
    dp = dp[~dp.variant.str.contains("bs~") & ~dp.variant.str.contains("C~")]
    tests = []
    for (task, model), g in dp.groupby(["task", "model"]):
        aligned, head = g[g.objective == "prompt"], g[g.objective == "head"]
        if len(aligned) and len(head):
            tests.append(_pair(ev, "d", aligned, head, ALIGNED_MARGIN,
                               f"{task} · {model} · full · ε=8: aligned objective − new head",
                               {"aligned objective": aligned}))
    return combine("d", tests, "needs the prompt and the head objective at ε = 8 on one task and model",
                   "the new head is as good or better")


def claim_e(ev: Evidence, bench=None) -> Verdict:
    if not bench:
        return Verdict("e", UNTESTABLE, why="needs the clipping benchmark (benchmark.in_report, or benchmark_cpu)")
    from privtune.bench.clipping import memory_ratio

    recs = [(r, *memory_ratio(r)) for r in bench.get("records", []) if r.get("method") == "ours_bk"]
    recs = [(r, m, kind) for r, m, kind in recs if m]
    if not recs:
        return Verdict("e", UNTESTABLE, why="the benchmark has no memory ratio for ours_bk")
    # live tensors' peak (a CPU) and a GPU's allocations are one number per shape; a resident set's moves
    # by a few per cent between runs (what the allocator kept, other processes)
    nums = [f"{r['shape']} on {bench.get('device')}: peak memory {m:.2f}× non-private ({kind}"
            + (f"; resident set {r['memory_ratio']:.2f}×" if kind == "tensors" and r.get("memory_ratio") else "")
            + f"), time {r['time_ratio']:.2f}×"
            + (f" ({r['time_ratio_interleaved']:.2f}× alternated in one process)" if r.get("time_ratio_interleaved")
               else "")
            + (" (one measurement: deterministic for a shape, so no interval)" if kind != "resident set"
               else " (one measurement)") for r, m, kind in recs]
    ok = all(m <= MEMORY_RATIO for _, m, _ in recs)
    return Verdict("e", HOLDS if ok else FAILS, nums, "" if ok else "peak memory above the threshold on a shape")


def claim_f(ev: Evidence, bench=None) -> Verdict:
    dp = _main(ev.df)
    dp = dp[(dp.eps != "inf") & (dp.eps != "0")]
    tests = []
    for (task, model, eps), g in dp.groupby(["task", "model", "eps"]):
        full = g[g.method == "full"]
        small = {m: g[g.method == m] for m in ("lora", "top2", "prefix") if (g.method == m).any()}
        if not (len(full) and small):
            continue
        best = max(small, key=lambda m: _mean(small[m]))
        what = f"{task} · {model} · ε={eps}: full − {best} (the best of {', '.join(small)})"
        checks = [ev.learned(x, m) for m, x in (("full", full), (best, small[best]))]
        if not any(ok for ok, _ in checks):  # equal because nothing moved: no test of the number of parameters
            tests.append(Test(UNTESTABLE, f"{what}: not testable, neither learned — "
                              + "; ".join(line for _, line in checks)))
            continue
        tests.append(_pair(ev, "f", full, small[best], -PARAM_TOLERANCE, what, {}))
    return combine("f", tests, "needs full fine-tuning beside LoRA, prefix or top2 under DP",
                   "a method with fewer trainable parameters does better under DP at this scale")


def _child_groups(ev: Evidence):
    base = _main(ev.df)
    base = base[base.task.isin(CHILD_TASKS) & (base.eps == "inf")]
    for task, g in base.groupby("task"):
        yield task, {m: g[g.method == m] for m in ("vanilla", "ct_f", "ct_d") if (g.method == m).any()}


def claim_g(ev: Evidence, bench=None) -> Verdict:
    tests = []
    for task, m in _child_groups(ev):
        if {"vanilla", "ct_f", "ct_d"} <= set(m):
            for ct in ("ct_f", "ct_d"):
                tests.append(_pair(ev, "g", m[ct], m["vanilla"], 0.0, f"{task} non-private: {ct} − vanilla", m))
    return combine("g", tests, "needs vanilla, CT_F and CT_D non-private on a task of Xu et al.",
                   "a Child-Tuning variant is not above vanilla")


def claim_h(ev: Evidence, bench=None) -> Verdict:
    tests = []
    for task, m in _child_groups(ev):
        if {"ct_f", "ct_d"} <= set(m):
            tests.append(_pair(ev, "h", m["ct_d"], m["ct_f"], -CHILD_TOLERANCE, f"{task} non-private: ct_d − ct_f",
                               {k: m[k] for k in ("ct_f", "ct_d")}))
    return combine("h", tests, "needs CT_F and CT_D non-private on a task of Xu et al.", "CT_F is above CT_D")


_CI = "the difference's 95 % interval (paired bootstrap over seeds and evaluation examples)"
CLAIMS = [
    Claim("a", "li2022", "At ε = 8 (and 3), DP fine-tuning is within a few points of non-private fine-tuning.",
          f"{_CI} of DP − non-private (full fine-tuning, same task, model, objective) lies above −{DP_GAP:g} points; "
          "both runs must have learned, and a non-private run that is not above zero-shot or is below DP beyond the "
          "interval makes the baseline suspect", claim_a),
    Claim("b", "li2022", "Under DP the best batch size × learning rate is a large batch with a large lr; small batch "
          "with small lr (non-private style) is much worse.",
          f"in every DP grid, {_CI} of the recommended cell (largest batch, lr at or above the grid's median) − the "
          f"smallest-batch, smallest-lr cell lies above {SWEEP_MARGIN:g} points, and no other cell is above the "
          "recommended one beyond the interval", claim_b),
    Claim("c", "li2022", "A small clipping norm is as good as or better than a large one.",
          f"at equal ε, {_CI} of smallest − largest clipping norm lies above −{CLIP_TOLERANCE:g} point; both must "
          "have learned", claim_c),
    Claim("d", "li2022", "An objective aligned with pre-training beats a new classification head under DP.",
          f"at ε = 8, {_CI} of aligned − head lies above {ALIGNED_MARGIN:g} point; the aligned run must have "
          "learned beyond its zero-shot model", claim_d),
    Claim("e", "li2022", "Ghost clipping's memory is close to non-private training.",
          f"book-keeping ghost clipping's peak memory at most {MEMORY_RATIO:g}× non-private on every benchmark shape",
          claim_e),
    Claim("f", "li2022", "Fewer trainable parameters do not by themselves help under DP (full fine-tuning ≥ LoRA, "
          "top2).", f"under DP, {_CI} of full − the best of LoRA, prefix and top2 lies above −{PARAM_TOLERANCE:g} "
          "point (same task, model, ε); a pair where neither learned is not a test", claim_f),
    Claim("g", "xu2021", "Child-Tuning_F and Child-Tuning_D beat vanilla fine-tuning.",
          f"non-private, {_CI} of CT_F − vanilla and of CT_D − vanilla lie above 0 on every task that ran all "
          "three; all three must have learned beyond the constant prediction", claim_g),
    Claim("h", "xu2021", "Child-Tuning_D is at least as good as Child-Tuning_F.",
          f"non-private, {_CI} of CT_D − CT_F lies above −{CHILD_TOLERANCE:g} point on every task that ran both; "
          "both must have learned beyond the constant prediction", claim_h),
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


def evaluate_claims(df: pd.DataFrame, bench: dict | None = None,
                    predictions: dict[tuple, RunPredictions] | None = None) -> list[tuple[Claim, Verdict]]:
    ev = Evidence(accounted(headline(df)), predictions or {})
    return [(c, c.test(ev, bench)) for c in CLAIMS]
