"""Result tables: one row per run and metric, the published value beside ours.

Scales follow the papers: accuracy, F1, MCC, correlations and ROUGE-L/METEOR in
percent; BLEU on 0-100; NIST and CIDEr raw. Published values are kept as data in
``privtune/published/{paper}.csv`` with their source.
"""
from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import pandas as pd

from ..io import read_json, write_atomic

PERCENT = {"accuracy", "f1", "mcc", "pearson", "spearman"}
COLUMNS = ["task", "model", "method", "eps", "seed", "metric", "ours", "epsilon_spent", "noise_multiplier",
           "published", "published_model", "published_source"]


def published(paper: str) -> pd.DataFrame:
    path = files("privtune") / "published" / f"{paper}.csv"
    df = pd.read_csv(path, dtype={"epsilon": str})
    df["epsilon"] = df["epsilon"].map(lambda e: "inf" if str(e) == "inf" else f"{float(e):g}")
    return df


def collect(metric_files) -> pd.DataFrame:
    rows = []
    for f in metric_files:
        m = read_json(f)
        for name, value in m["metrics"].items():
            v = float(value) * (100 if name in PERCENT else 1)
            rows.append({"task": m["task"], "model": m["model"], "method": m["method"], "eps": str(m["eps"]),
                         "seed": int(m["seed"]), "metric": name, "ours": round(v, 2),
                         "epsilon_spent": None if m.get("epsilon_spent") is None else round(m["epsilon_spent"], 3),
                         "noise_multiplier": round(m.get("noise_multiplier") or 0.0, 4)})
    return pd.DataFrame(rows)


def with_published(df: pd.DataFrame, paper: str) -> pd.DataFrame:
    pub = published(paper)
    out = []
    for _, r in df.iterrows():
        hit = pub[(pub.task == r.task) & (pub.method == r.method)
                  & (pub.epsilon == r.eps) & (pub.metric == r.metric)]
        if len(hit):
            h = hit.iloc[0]  # the paper's first-listed (smallest) model for this cell
            out.append({**r, "published": h.value, "published_model": h.model, "published_source": h.source})
        else:
            out.append({**r, "published": None, "published_model": None, "published_source": None})
    return pd.DataFrame(out, columns=COLUMNS)


def _eps_key(e: str) -> float:
    return math.inf if e == "inf" else float(e)


METHOD_ORDER = ["full", "vanilla", "ct_f", "ct_d"]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, model, ε, metric), one column per method: mean ± standard deviation over
    seeds (n seeds), and the paper's value in brackets where it reports one."""
    def cell(g: pd.DataFrame) -> str:
        text = f"{g.ours.mean():.2f}" + (f" ± {g.ours.std():.2f} (n={len(g)})" if len(g) > 1 else "")
        pub = g.published.dropna()
        return text + (f" [paper: {pub.iloc[0]:g}]" if len(pub) else "")

    keys = ["task", "model", "eps", "metric"]
    cells = df.groupby([*keys, "method"], sort=False).apply(cell, include_groups=False).rename("cell").reset_index()
    table = cells.pivot(index=keys, columns="method", values="cell")
    table = table[[m for m in METHOD_ORDER if m in table.columns] +
                  [m for m in table.columns if m not in METHOD_ORDER]]
    return table.reset_index().fillna("")


def write_tables(metric_files, paper: str, md_path, csv_path) -> pd.DataFrame:
    df = collect(metric_files)
    if df.empty:
        raise ValueError(f"no metrics for paper {paper}")
    df = with_published(df, paper)
    df = df.sort_values(by=["task", "model", "method", "metric", "eps", "seed"],
                        key=lambda c: c.map(_eps_key) if c.name == "eps" else c).reset_index(drop=True)
    write_atomic(csv_path, df.to_csv(index=False))
    title = {"li2022": "Li et al. (ICLR 2022): DP fine-tuning with ghost clipping",
             "xu2021": "Xu et al. (EMNLP 2021): Child-Tuning"}.get(paper, paper)
    md = [f"# {title}", "",
          "One row per run and metric. `eps` is the target ε (inf: non-private); `epsilon_spent` the largest ε of "
          "the accountants asked (RDP, PRV, dp-accounting RDP). `published` is the paper's number for the same "
          "task, method and ε, on the paper's model (`published_model`), where the paper reports one.", "",
          "## Summary: mean ± standard deviation over seeds", "",
          summary(df).to_markdown(index=False), "",
          "## Every run", "",
          df.astype(object).fillna("").to_markdown(index=False), ""]
    write_atomic(md_path, "\n".join(md))
    return df
