"""Figures (matplotlib, headless)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import save_figure  # noqa: E402

MAIN_METRIC = {"sst2": "accuracy", "qnli": "accuracy", "mnli": "accuracy", "qqp": "accuracy", "rte": "accuracy",
               "mrpc": "accuracy", "cola": "mcc", "stsb": "pearson", "e2e": "bleu", "dart": "bleu"}


def _main_metric_rows(table_csv) -> pd.DataFrame:
    """The rows of a results table that hold each task's headline metric."""
    df = pd.read_csv(table_csv, dtype={"eps": str})
    return df[df.apply(lambda r: MAIN_METRIC.get(r.task) == r.metric, axis=1)]


def metric_vs_epsilon(table_csv, out_png) -> None:
    """One panel per (task, model, method): metric against ε, non-private as a dashed line."""
    df = _main_metric_rows(table_csv)
    groups = list(df.groupby(["task", "model", "method"]))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.4), squeeze=False)
    for ax, ((task, model, method), g) in zip(axes[0], groups):
        priv = g[g.eps != "inf"].assign(e=lambda d: d.eps.astype(float)).groupby("e")
        if len(priv):
            mean, std = priv.ours.mean(), priv.ours.std().fillna(0)
            ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=3, label=f"{model} (DP)")
        nonpriv = g[g.eps == "inf"].ours
        if len(nonpriv):
            ax.axhline(nonpriv.mean(), ls="--", color="grey", label="non-private")
        pub = g.dropna(subset=["published"])
        pub = pub[pub.eps != "inf"]
        if len(pub):
            ax.scatter(pub.eps.astype(float), pub.published, marker="x", color="k",
                       label=f"published ({pub.published_model.iloc[0]})")
        ax.set_title(f"{task} · {model} · {method}")
        ax.set_xlabel("ε (target)")
        ax.set_ylabel(MAIN_METRIC.get(task, "metric"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=120)
    plt.close(fig)


def child_tuning_bars(table_csv, out_png) -> None:
    """Per task: vanilla, CT_F and CT_D side by side (mean over seeds, spread as error bars)."""
    df = _main_metric_rows(table_csv)
    order = [m for m in ("vanilla", "ct_f", "ct_d") if m in set(df.method)]
    groups = list(df.groupby(["task", "model", "eps"]))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.4), squeeze=False)
    for ax, ((task, model, eps), g) in zip(axes[0], groups):
        stats = g.groupby("method").ours.agg(["mean", "std"]).reindex(order)
        ax.bar(range(len(order)), stats["mean"].values, yerr=stats["std"].fillna(0).values, capsize=4,
               color=["#999999", "#4c72b0", "#dd8452"][: len(order)])
        for i, v in enumerate(stats["mean"].values):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(order)), [m.replace("_", "-").upper() if m != "vanilla" else m for m in order])
        ax.set_title(f"{task} · {model} · ε={eps}")
        ax.set_ylabel(MAIN_METRIC.get(task, "metric"))
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=120)
    plt.close(fig)


FIGURES = {"metric_vs_epsilon": metric_vs_epsilon, "child_tuning": child_tuning_bars}
PAPER_FIGURES = {"li2022": ["metric_vs_epsilon"], "xu2021": ["child_tuning"]}
