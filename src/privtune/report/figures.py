"""Figures (matplotlib, headless), each written as PNG and SVG.

Every function takes its input files and the PNG path (the SVG goes beside it):

* ``metric_vs_epsilon``: utility against ε per task and method, a line per model (size),
  non-private as dashed lines, the paper's values as crosses;
* ``hparam_heatmap``: the DP batch size × learning rate sweep (Li et al.'s heatmap);
* ``child_tuning``: per-task bars of vanilla, CT_F, CT_D with the spread over seeds;
* ``metric_vs_parameters``: Li et al.'s "dimension does not explain it" plot: the metric of each
  fine-tuning method (full, LoRA, prefix, top2, retrain) against its trainable-parameter count, a
  line per ε, with the paper's values for the same methods;
* ``epsilon_vs_steps``: ε spent against training steps for every DP run, from its privacy.json;
* ``benchmark``: step time and peak memory against model size (non-private, ours, Opacus).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from privtune.io import read_json, save_figure  # noqa: E402
from privtune.report.tables import main_runs  # noqa: E402
from privtune.tasks import TASKS  # noqa: E402

def main_metric(task: str) -> str | None:
    """The task's headline metric (the task registry's, user tasks included), None for an unknown task."""
    t = TASKS.get(task)
    return t.main_metric if t is not None else None


def save_png_svg(fig, out_png) -> None:
    """Write ``out_png`` and the same figure as SVG beside it."""
    out_png = Path(out_png)
    save_figure(fig, out_png, dpi=120)
    save_figure(fig, out_png.with_suffix(".svg"))
    plt.close(fig)


def _main_metric_rows(table_csv) -> pd.DataFrame:
    """The rows of a results table that hold each task's headline metric."""
    df = pd.read_csv(table_csv, dtype={"eps": str, "variant": str}, keep_default_na=False,
                     na_values={k: [""] for k in ("ours", "published", "batch_size", "lr", "clip_norm", "ci_low",
                                                  "ci_high")})
    return df[df.apply(lambda r: main_metric(r.task) == r.metric, axis=1)]


def error_bars(groups) -> np.ndarray:
    """Error bars (2, k) for k groups of runs that differ only in their seed: the standard deviation over
    seeds where a group has several, else the run's 95 % bootstrap interval over its evaluation examples
    (``ci_low`` / ``ci_high``, written by the evaluation stage); 0 where neither is known."""
    bars = []
    for g in groups:
        mean = g.ours.mean()
        if not len(g):  # a method missing from this panel
            bars.append((0.0, 0.0))
        elif len(g) > 1:
            sd = float(g.ours.std())
            bars.append((sd, sd))
        elif {"ci_low", "ci_high"} <= set(g) and pd.notna(g.ci_low.iloc[0]) and pd.notna(g.ci_high.iloc[0]):
            bars.append((mean - float(g.ci_low.iloc[0]), float(g.ci_high.iloc[0]) - mean))
        else:
            bars.append((0.0, 0.0))
    return np.array(bars, dtype=float).reshape(-1, 2).T.clip(min=0)


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, max(1, n), figsize=(width * max(1, n), height), squeeze=False)
    return fig, axes[0]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def metric_vs_epsilon(inputs, out_png) -> None:
    """One panel per (task, method): metric against ε, a line per model (error bars: :func:`error_bars`),
    non-private dashed, the zero-shot model (same objective, no training) dotted."""
    df = main_runs(_main_metric_rows(inputs[0]))
    zero = df[df.method == "zeroshot"]
    df = df[df.method != "zeroshot"]
    groups = list(df.groupby(["task", "method"]))
    fig, axes = _panels(len(groups))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((task, method), g) in zip(axes, groups):
        for i, (model, gm) in enumerate(g.groupby("model")):
            c = colors[i % len(colors)]
            priv = gm[gm.eps != "inf"].assign(e=lambda d: d.eps.astype(float)).groupby("e")
            if len(priv):
                mean = priv.ours.mean()
                ax.errorbar(mean.index, mean.values, yerr=error_bars(g for _, g in priv), marker="o", capsize=3,
                            color=c, label=f"{model} (DP)")
                for x, y in zip(mean.index, mean.values):
                    ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            nonpriv = gm[gm.eps == "inf"].ours
            if len(nonpriv):
                ax.axhline(nonpriv.mean(), ls="--", color=c, alpha=0.7,
                           label=f"{model} non-private ({nonpriv.mean():.1f})")
            zs = zero[(zero.task == task) & (zero.model == model)].ours
            if len(zs):
                ax.axhline(zs.mean(), ls=":", color=c, alpha=0.9, label=f"{model} zero-shot ({zs.mean():.1f})")
        pub = g.dropna(subset=["published"])
        pub = pub[pub.eps != "inf"].drop_duplicates(["eps", "published_model"])
        for model, gp in pub.groupby("published_model"):
            ax.scatter(gp.eps.astype(float), gp.published, marker="x", color="k", label=f"paper ({model})")
        ax.set_title(f"{task} · {method}")
        ax.set_xlabel("ε (target)")
        ax.set_ylabel(main_metric(task) or "metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not groups:
        _empty(axes[0], "no runs")
    fig.tight_layout()
    save_png_svg(fig, out_png)


def hparam_heatmap(inputs, out_png) -> None:
    """One panel per (task, model, method, ε) of a sweep: the metric on the batch size × lr grid."""
    df = _main_metric_rows(inputs[0])
    df = df[df.variant.str.contains("bs~") & df.variant.str.contains("lr~")]
    groups = list(df.groupby(["task", "model", "method", "eps"]))
    fig, axes = _panels(len(groups), width=4.8, height=3.8)
    for ax, ((task, model, method, eps), g) in zip(axes, groups):
        grid = g.groupby(["batch_size", "lr"]).ours.mean().unstack("lr").sort_index()
        im = ax.imshow(grid.values, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{int(v)}" for v in grid.index])
        lo, hi = np.nanmin(grid.values), np.nanmax(grid.values)
        for (i, j), v in np.ndenumerate(grid.values):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="w" if v < (lo + hi) / 2 else "k")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("batch size (expected)")
        ax.set_title(f"{task} · {model} · {method} · ε={eps}")
        fig.colorbar(im, ax=ax, label=main_metric(task) or "metric")
    if not groups:
        _empty(axes[0], "no sweep in the config (experiments[].sweep)")
    fig.tight_layout()
    save_png_svg(fig, out_png)


METHOD_MARKERS = {"full": "o", "lora": "s", "prefix": "^", "top2": "D", "retrain": "v"}


def metric_vs_parameters(inputs, out_png) -> None:
    """One panel per (task, model): each method's metric against its trainable parameters (log x), a
    line per ε joining the methods in order of size; the paper's value for each method in the legend."""
    df = main_runs(_main_metric_rows(inputs[0]))
    df = df[df.method.isin(list(METHOD_MARKERS))].dropna(subset=["trainable_parameters"])
    groups = [(k, g) for k, g in df.groupby(["task", "model"]) if g.method.nunique() > 1]  # a comparison
    fig, axes = _panels(len(groups), width=6.4, height=4.4)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((task, model), g) in zip(axes, groups):
        notes = []
        for i, (eps, ge) in enumerate(sorted(g.groupby("eps"), key=lambda kv: float(kv[0]))):
            stats = ge.groupby("method").agg(x=("trainable_parameters", "first"), y=("ours", "mean"),
                                             sd=("ours", "std")).sort_values("x")
            c = colors[i % len(colors)]
            label = "non-private" if eps == "inf" else f"ε = {eps}"
            ax.plot(stats.x, stats.y, color=c, alpha=0.5, ls="--" if eps == "inf" else "-", label=label)
            for j, (method, r) in enumerate(stats.iterrows()):
                ax.errorbar(r.x, r.y, yerr=0 if math.isnan(r.sd) else r.sd, color=c, capsize=3,
                            marker=METHOD_MARKERS[method], ls="none")
                ax.annotate(f"{method} {r.y:.1f}", (r.x, r.y), textcoords="offset points", fontsize=7, color=c,
                            xytext=(5, 4 + 9 * (j % 3) - 12 * i))  # staggered: equal sizes (full, retrain)
            pub = ge.dropna(subset=["published"]).drop_duplicates("method")
            if len(pub):
                notes.append(f"paper ({pub.published_model.iloc[0]}, {label}): " + ", ".join(
                    f"{m} {v:g}" for m, v in zip(pub.method, pub.published)))
        ax.set_xscale("log")
        ax.set_xlabel("\n".join(["trainable parameters", *notes]), fontsize=8)  # the paper's values beneath
        ax.set_ylabel(main_metric(task) or "metric")
        ax.set_title(f"{task} · {model}: fine-tuning methods")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not groups:
        _empty(axes[0], "no runs of the fine-tuning methods (full, lora, prefix, top2, retrain)")
    fig.tight_layout()
    save_png_svg(fig, out_png)


def child_tuning_bars(inputs, out_png) -> None:
    """Per task: vanilla, CT_F and CT_D side by side (mean over seeds; error bars: :func:`error_bars`)."""
    df = main_runs(_main_metric_rows(inputs[0]))
    order = [m for m in ("vanilla", "ct_f", "ct_d") if m in set(df.method)]
    groups = list(df.groupby(["task", "model", "eps"]))
    fig, axes = _panels(len(groups))
    for ax, ((task, model, eps), g) in zip(axes, groups):
        stats = g.groupby("method").ours.agg(["mean", "count"]).reindex(order)
        ax.bar(range(len(order)), stats["mean"].values, yerr=error_bars(g[g.method == m] for m in order), capsize=4,
               color=["#999999", "#4c72b0", "#dd8452"][: len(order)])
        for i, (v, n) in enumerate(zip(stats["mean"].values, stats["count"].values)):
            ax.annotate(f"{v:.1f}\n(n={int(n)})" if n > 1 else f"{v:.1f}", (i, v), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(range(len(order)), [m.replace("_", "-").upper() if m != "vanilla" else m for m in order])
        ax.set_title(f"{task} · {model} · ε={eps}")
        ax.set_ylabel(main_metric(task) or "metric")
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
    if not groups:
        _empty(axes[0], "no Child-Tuning runs")
    fig.tight_layout()
    save_png_svg(fig, out_png)


def epsilon_curve(report: dict, points: int = 25) -> tuple[list[int], list[float]]:
    """ε spent after k steps, k = 0 … steps, from a run's privacy.json (its prior events, e.g. a DP
    Fisher, count from step 0), with the accountant the run was calibrated with."""
    from privtune.dp import accounting

    steps, q, sigma, delta = report["steps"], report["sample_rate"], report["noise_multiplier"], report["delta"]
    prior = [accounting.GaussianEvent(**e) for e in report.get("events", []) if e.get("label") != "training"]
    ks = sorted({max(1, round(x)) for x in np.linspace(1, steps, min(points, steps))})
    accountant = report.get("accountant_calibrated_with", "rdp")
    eps = [accounting.epsilon([*prior, accounting.GaussianEvent(sigma, q, k)], delta, accountant) for k in ks]
    return [0, *ks], [accounting.epsilon(prior, delta, accountant) if prior else 0.0, *eps]


def epsilon_vs_steps(inputs, out_png) -> None:
    """ε spent against training steps, one line per DP run; its target as a dotted line."""
    fig, axes = _panels(1, width=6.4, height=4.2)
    ax = axes[0]
    drawn = 0
    for f in inputs:
        rep = read_json(f)
        if not rep.get("private"):
            continue
        ks, eps = epsilon_curve(rep)
        parts = Path(f).parts
        label = "/".join(parts[parts.index("results") + 2: -3]) if "results" in parts else Path(f).parent.name
        label += f" ε={rep['target_epsilon']:g} (q={rep['sample_rate']:.3g}, σ={rep['noise_multiplier']:.2f})"
        line, = ax.plot(ks, eps, marker=".", label=label)
        ax.axhline(rep["target_epsilon"], color=line.get_color(), ls=":", lw=0.8)
        drawn += 1
    if drawn:
        ax.set_xlabel("training steps")
        ax.set_ylabel("ε spent (δ fixed per run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    else:
        _empty(ax, "no DP runs")
    fig.tight_layout()
    save_png_svg(fig, out_png)


BENCH_STYLE = {"nonprivate": ("non-private", "k", "-"), "ours_bk": ("ours (ghost, 1 backward)", "#4c72b0", "-"),
               "ours_ghost": ("ours (ghost, 2 passes)", "#4c72b0", "--"),
               "opacus_hooks": ("Opacus per-sample", "#dd8452", "-"),
               "opacus_ghost": ("Opacus ghost", "#c44e52", "-"),
               "opacus_ghost_untied": ("Opacus ghost (untied)", "#c44e52", "--")}


def benchmark(inputs, out_png, precision: str | None = None) -> None:
    """Step time and peak memory against model size (top), and as ratios to non-private training
    (bottom); methods that failed (Opacus refusing or running out of memory) are named in the title.
    ``precision``: only that precision's records (a run that measured several)."""
    data = read_json(inputs[0])
    records, device = data["records"], data["device"]
    if precision is not None:
        records = [r for r in records if r.get("precision", "fp32") == precision]
        device = f"{device}, {precision}"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.6))
    # a CPU's live-tensor peak where measured (one number per shape), else its resident set or a GPU's allocations
    tensors = any(r.get("tensor_peak_mb") for r in records)
    peak, ratio, what = (("tensor_peak_mb", "tensor_memory_ratio", "peak live tensors") if tensors
                         else ("peak_mb", "memory_ratio", "peak memory"))
    panels = (("time_s", axes[0, 0], "time per step (s)", True), (peak, axes[0, 1], f"{what} (MB)", True),
              ("time_ratio", axes[1, 0], "step time / non-private", False),
              (ratio, axes[1, 1], f"{what} / non-private", False))
    for key, ax, label, log_y in panels:
        for m, (name, color, ls) in BENCH_STYLE.items():
            pts = sorted((r["parameters"] / 1e6, r[key]) for r in records
                         if r["method"] == m and r["status"] == "ok" and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, ls=ls, label=name)
                x, y = pts[-1]
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 0), fontsize=7)
        if not log_y:
            ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    failed = [f"{r['shape']}/{r['method']}: {r['status']}" for r in records if r["status"] != "ok"]
    title = f"DP clipping cost on {device}, batch {data['batch']}, sequence length {data['seq']}"
    fig.suptitle(title + ("\nnot measured: " + "; ".join(failed[:6]) if failed else ""), fontsize=9)
    fig.tight_layout()
    save_png_svg(fig, out_png)


FIGURES = {"metric_vs_epsilon": metric_vs_epsilon, "hparam_heatmap": hparam_heatmap,
           "metric_vs_parameters": metric_vs_parameters,
           "child_tuning": child_tuning_bars, "epsilon_vs_steps": epsilon_vs_steps, "benchmark": benchmark}
