"""Result tables: one row per run and metric, the published value beside ours, and
the papers' own table layouts (Markdown, CSV and LaTeX).

Scales follow the papers: accuracy, F1, MCC and correlations in percent; BLEU,
METEOR and ROUGE-L on 0-100; NIST and CIDEr raw.

Published values are data, never typed into code: ``privtune/published/{paper}.csv`` (or the
folder ``PRIVTUNE_PUBLISHED_DIR`` names), one row per number with the columns of
:data:`PUBLISHED_COLUMNS`: the paper's table (``Table 2``) and the arXiv version it was read from
(``2110.05679v<k>``), and ``checked`` (yes / no: whether a person has compared the value with that
table). A row without its table or arXiv version is refused; an unchecked value is shown with
:data:`UNCHECKED_MARK`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from importlib.resources import files

import pandas as pd

from privtune.io import read_json, write_atomic
from privtune.tasks import TASKS

PERCENT = {"accuracy", "accuracy_mm", "f1", "mcc", "pearson", "spearman"}
COLUMNS = ["task", "model", "method", "objective", "variant", "batch_size", "lr", "clip_norm", "eps", "seed",
           "metric", "ours", "ci_low", "ci_high",
           "epsilon_spent", "noise_multiplier", "train_batch_size", "dataset_size", "trainable_parameters",
           "noise_norm", "guarantee_holds",
           "published", "published_model", "published_source", "published_checked"]
PUBLISHED_COLUMNS = ["paper", "table", "arxiv", "task", "model", "method", "epsilon", "metric", "value", "checked",
                     "source"]
UNCHECKED_MARK = "?"
UNCHECKED_NOTE = (f"{UNCHECKED_MARK} a published value that no person has yet compared with the table it names "
                  "(column `checked` of the published CSV).")
METHOD_ORDER = ["zeroshot", "full", "lora", "rgp", "prefix", "top2", "retrain", "vanilla", "ct_f", "ct_d"]
METRIC_ORDER = ["accuracy", "accuracy_mm", "f1", "mcc", "pearson", "spearman",
                "bleu", "nist", "meteor", "rouge_l", "cider", "ter"]
def task_name(task: str) -> str:
    """The tables' name of a task (the task registry's ``display``, user tasks included)."""
    t = TASKS.get(task)
    return t.display if t is not None else task
METRIC_NAMES = {"accuracy": "acc", "accuracy_mm": "acc-mm", "f1": "F1", "mcc": "MCC", "pearson": "Pearson",
                "spearman": "Spearman", "bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L",
                "cider": "CIDEr", "ter": "TER"}


@dataclass(frozen=True)
class Layout:
    """One of a paper's tables: which tasks it holds; columns are ``task metric``, rows (model, method, ε)."""

    name: str
    title: str
    tasks: tuple[str, ...]


LAYOUTS = {
    "li2022": [
        Layout("classification", "Li et al. 2022, sentence classification (Table 1 layout): accuracy",
               ("mnli", "qqp", "qnli", "sst2")),
        Layout("e2e", "Li et al. 2022, E2E (Table 2 layout)", ("e2e",)),
        Layout("dart", "Li et al. 2022, DART (Table 2 layout)", ("dart",)),
    ],
    "xu2021": [
        Layout("glue", "Xu et al. 2021, GLUE (Table 1 layout): vanilla fine-tuning vs Child-Tuning",
               ("cola", "rte", "mrpc", "stsb")),
    ],
}


def published_dir() -> Path:
    return Path(os.environ.get("PRIVTUNE_PUBLISHED_DIR") or str(files("privtune") / "published"))


def published(paper: str) -> pd.DataFrame:
    """The paper's published values (empty when none are entered), checked for their provenance."""
    path = published_dir() / f"{paper}.csv"
    if not path.exists():
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    df = pd.read_csv(path, dtype={"epsilon": str, "table": str, "arxiv": str, "checked": str})
    missing = [c for c in PUBLISHED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; the columns are {', '.join(PUBLISHED_COLUMNS)} "
                         "(README, 'Published numbers')")
    for col, what in (("table", "the paper's table it was read from (e.g. Table 2)"),
                      ("arxiv", "the arXiv version it was read from (e.g. 2110.05679v2)")):
        bad = [i + 2 for i, v in enumerate(df[col]) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"{path}, line(s) {bad}: column {col!r} is empty; every published value names "
                             f"{what}. Fill it in, or remove the row")
    bad = [i + 2 for i, v in enumerate(df.checked) if str(v).strip().lower() not in ("yes", "no")]
    if bad:
        raise ValueError(f"{path}, line(s) {bad}: column 'checked' must be yes (a person compared the value with "
                         "its table) or no")
    value = pd.to_numeric(df.value, errors="coerce")
    bad = [i + 2 for i, v in enumerate(value) if not math.isfinite(v)]
    bad_eps = [i + 2 for i, e in enumerate(df.epsilon) if str(e) != "inf" and pd.isna(pd.to_numeric(e, errors="coerce"))]
    if bad or bad_eps:
        raise ValueError(f"{path}, line(s) {sorted(set(bad + bad_eps))}: 'value' must be a number and 'epsilon' a "
                         "number or inf")
    dup = df.duplicated(subset=["task", "model", "method", "epsilon", "metric"], keep=False)
    if dup.any():
        raise ValueError(f"{path}, line(s) {[i + 2 for i in dup[dup].index]}: the same task, model, method, epsilon "
                         "and metric twice; keep one value per cell")
    df["value"] = value
    df["checked"] = df.checked.str.strip().str.lower() == "yes"
    df["epsilon"] = df["epsilon"].map(lambda e: "inf" if str(e) == "inf" else f"{float(e):g}")
    return df


def _published_text(value: float, checked: bool) -> str:
    return f"{value:g}" + ("" if checked else UNCHECKED_MARK)


def collect(metric_files) -> pd.DataFrame:
    rows = []
    for f in metric_files:
        m = read_json(f)
        hp = m.get("hparams") or {}
        for name, value in m["metrics"].items():
            v = float(value) * (100 if name in PERCENT else 1)
            ci = (m.get("intervals") or {}).get(name) or (None, None)  # already in the tables' scale
            rows.append({"task": m["task"], "model": m["model"], "method": m["method"],
                         "objective": m.get("objective", "head"), "variant": m.get("variant", ""),
                         "batch_size": hp.get("batch_size"), "lr": hp.get("lr"), "clip_norm": hp.get("clip_norm", m.get("clip_norm")),
                         "eps": str(m["eps"]), "seed": int(m["seed"]), "metric": name, "ours": round(v, 2),
                         "ci_low": None if ci[0] is None else round(ci[0], 2),
                         "ci_high": None if ci[1] is None else round(ci[1], 2),
                         "epsilon_spent": None if m.get("epsilon_spent") is None else round(m["epsilon_spent"], 3),
                         "noise_multiplier": round(m.get("noise_multiplier") or 0.0, 4),
                         "train_batch_size": m.get("train_batch_size"), "dataset_size": m.get("dataset_size"),
                         "trainable_parameters": m.get("trainable_parameters"),
                         "noise_norm": None if m.get("noise_norm") is None else round(m["noise_norm"], 4),
                         "guarantee_holds": bool(m.get("guarantee_holds", True))})
    return pd.DataFrame(rows)


def with_published(df: pd.DataFrame, paper: str) -> pd.DataFrame:
    """Add the paper's value for the same task, method, ε and metric: on the same model where the
    paper reports it (the paper preset), else on the paper's first-listed (smallest) model."""
    pub = published(paper)
    out = []
    for _, r in df.iterrows():
        hit = pub[(pub.task == r.task) & (pub.method == r.method)
                  & (pub.epsilon == r.eps) & (pub.metric == r.metric)]
        same = hit[hit.model == r.model]
        if len(hit):
            h = (same if len(same) else hit).iloc[0]
            out.append({**r, "published": h.value, "published_model": h.model,
                        "published_source": f"{h.source}; {h.table}, arXiv:{h.arxiv}",
                        "published_checked": bool(h.checked)})
        else:
            out.append({**r, "published": None, "published_model": None, "published_source": None,
                        "published_checked": None})
    return pd.DataFrame(out, columns=COLUMNS)


def _eps_key(e: str) -> float:
    return math.inf if e == "inf" else float(e)


def _order(values, order) -> list:
    return [v for v in order if v in set(values)] + sorted(v for v in set(values) if v not in order)


UNACCOUNTED_MARK = "†"
UNACCOUNTED_NOTE = (f"{UNACCOUNTED_MARK} a run whose ε does not hold: it used a setting the accountant does not "
                    "cover (sampling shuffle, verify_engine false or a noiseless Fisher mask under DP), allowed by "
                    "train.allow_unaccounted; its privacy.json lists which (`unaccounted`).")


def _cell(g: pd.DataFrame, published: bool = True) -> str:
    """Mean ± standard deviation over seeds (n), and the paper's value in brackets; † when a run's ε
    does not hold (:data:`UNACCOUNTED_NOTE`)."""
    text = f"{g.ours.mean():.2f}" + (f" ± {g.ours.std():.2f} (n={len(g)})" if len(g) > 1 else "")
    if "guarantee_holds" in g and not g.guarantee_holds.fillna(True).astype(bool).all():
        text += UNACCOUNTED_MARK
    pub = g[g.published.notna()]
    if not (published and len(pub)):
        return text
    return text + f" [paper: {_published_text(pub.published.iloc[0], bool(pub.published_checked.iloc[0]))}]"


def main_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The experiments' main runs (a sweep's grid points are drawn as the heatmap instead)."""
    return df[df.variant.fillna("") == ""] if "variant" in df else df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, model, ε, metric), one column per method: mean ± standard deviation over
    seeds (n seeds), and the paper's value in brackets where it reports one."""
    keys = ["task", "model", "eps", "metric"]
    cells = df.groupby([*keys, "method"], sort=False).apply(_cell, include_groups=False).rename("cell").reset_index()
    table = cells.pivot(index=keys, columns="method", values="cell")
    table = table[_order(table.columns, METHOD_ORDER)]
    return table.reset_index().fillna("")


def _eps_label(e: str) -> str:
    return {"inf": "non-private", "0": "0 (zero-shot: no training)"}.get(e, e)


def paper_table(df: pd.DataFrame, paper: str, layout: Layout) -> pd.DataFrame:
    """The paper's table filled with our runs: rows ``ours`` (model, method, ε) with mean ± sd over
    seeds, and beneath them rows ``paper`` holding the published values (model as published) for the
    same tasks, methods, ε and metrics. Empty when no run of ours falls in the table."""
    ours = main_runs(df)
    ours = ours[ours.task.isin(layout.tasks)]
    if ours.empty:
        return pd.DataFrame()
    cols = [(t, m) for t in layout.tasks for m in _order(ours[ours.task == t].metric, METRIC_ORDER)]
    header = [f"{task_name(t)} {METRIC_NAMES.get(m, m)}" for t, m in cols]
    rows = []
    keys = sorted({(r.model, r.method, r.eps) for r in ours.itertuples()},
                  key=lambda k: (k[0], METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else 99, _eps_key(k[2])))
    for model, method, eps in keys:
        g = ours[(ours.model == model) & (ours.method == method) & (ours.eps == eps)]
        row = {"source": "ours", "model": model, "method": method, "ε": _eps_label(eps)}
        for (t, m), h in zip(cols, header):
            hit = g[(g.task == t) & (g.metric == m)]
            row[h] = _cell(hit, published=False) if len(hit) else ""
        rows.append(row)
    pub = published(paper)
    pub = pub[pub.task.isin(layout.tasks) & pub.method.isin(set(ours.method)) & pub.epsilon.isin(set(ours.eps))]
    for (model, method, eps), g in sorted(pub.groupby(["model", "method", "epsilon"]),
                                          key=lambda kv: (kv[0][0], kv[0][1], _eps_key(kv[0][2]))):
        row = {"source": "paper", "model": model, "method": method, "ε": _eps_label(eps)}
        for (t, m), h in zip(cols, header):
            hit = g[(g.task == t) & (g.metric == m)]
            row[h] = _published_text(hit.value.iloc[0], bool(hit.checked.iloc[0])) if len(hit) else ""
        if any(row[h] for h in header):
            rows.append(row)
    return pd.DataFrame(rows, columns=["source", "model", "method", "ε", *header])


FINE_TUNING_METHODS = ("full", "lora", "rgp", "prefix", "top2", "retrain")
NOT_IMPLEMENTED = {"rgp": "not run: RGP not implemented"}


def methods_table(df: pd.DataFrame, paper: str) -> pd.DataFrame:
    """Li et al.'s comparison of fine-tuning methods (their E2E table): per task and model that ran more than
    one method, a row per method with its trainable parameters and, per ε, ours beside the paper's value.
    Methods the paper has and we do not run (RGP) keep their row, saying so."""
    ours = main_runs(df)
    ours = ours[ours.method.isin(FINE_TUNING_METHODS)]
    pub = published(paper)
    rows = []
    for (task, model), g in ours.groupby(["task", "model"]):
        if g.method.nunique() < 2:
            continue
        metric = _order(g.metric, METRIC_ORDER)[0]
        g = g[g.metric == metric]
        p = pub[(pub.task == task) & (pub.metric == metric) & pub.method.isin(FINE_TUNING_METHODS)]
        epsilons = sorted(set(g.eps) | set(p.epsilon), key=_eps_key)
        # the paper's methods that we do not run keep their row (saying so), published numbers or not
        for method in _order(set(g.method) | set(p.method) | set(NOT_IMPLEMENTED), list(FINE_TUNING_METHODS)):
            gm, pm = g[g.method == method], p[p.method == method]
            params = gm.trainable_parameters.dropna()
            noise = gm[gm.eps != "inf"].noise_norm.dropna()
            row = {"task": task_name(task), "model": model, "method": method,
                   "trainable parameters": f"{int(params.iloc[0]):,}" if len(params) else "",
                   "noise norm of the averaged update (DP)": f"{noise.mean():.3g}" if len(noise) else ""}
            for e in epsilons:
                hit, ph = gm[gm.eps == e], pm[pm.epsilon == e]
                row[f"ours {METRIC_NAMES.get(metric, metric)} ε={_eps_label(e)}"] = (
                    _cell(hit, published=False) if len(hit) else NOT_IMPLEMENTED.get(method, ""))
                row[f"paper ε={_eps_label(e)}"] = (
                    f"{_published_text(ph.value.iloc[0], bool(ph.checked.iloc[0]))} ({ph.model.iloc[0]})"
                    if len(ph) else "")
            rows.append(row)
    return pd.DataFrame(rows)


def _latex(table: pd.DataFrame, caption: str, label: str) -> str:
    body = table.to_latex(index=False, escape=True, caption=caption, label=label, position="ht")
    return body.replace("±", r"$\pm$").replace("ε", r"$\varepsilon$")


def write_tables(metric_files, paper: str, md_path, csv_path, tex_path=None) -> pd.DataFrame:
    """Write the long table (every run × metric, CSV), and Markdown / LaTeX with the paper's layouts,
    the per-method summary and every run. Returns the long table."""
    df = collect(metric_files)
    if df.empty:
        raise ValueError(f"no metrics for paper {paper}")
    df = with_published(df, paper)
    df = df.sort_values(by=["task", "model", "method", "variant", "metric", "eps", "seed"],
                        key=lambda c: c.map(_eps_key) if c.name == "eps" else c).reset_index(drop=True)
    write_atomic(csv_path, df.to_csv(index=False))
    title = {"li2022": "Li et al. (ICLR 2022): DP fine-tuning with ghost clipping",
             "xu2021": "Xu et al. (EMNLP 2021): Child-Tuning"}.get(paper, paper)
    md = [f"# {title}", "",
          "Scales: accuracy, F1, MCC and correlations in percent; BLEU, METEOR, ROUGE-L on 0-100; NIST and "
          "CIDEr raw. `eps` is the target ε (inf: non-private); `epsilon_spent` the largest ε of the accountants "
          "asked (RDP, PRV, dp-accounting RDP). Cells are mean ± standard deviation over seeds (n). Rows `paper` "
          "hold the published values (source, table and arXiv version in `published_source` of the CSV and in "
          f"`privtune/published/{paper}.csv`), on the paper's models; {UNCHECKED_MARK} marks one nobody has "
          "checked against its table yet.", ""]
    tex = [f"% {title}: generated by privtune (rule tables); published rows from privtune/published/{paper}.csv"]
    main = main_runs(df)
    for layout in LAYOUTS.get(paper, []):
        table = paper_table(df, paper, layout)
        if table.empty:
            continue
        md += [f"## {layout.title}", "", table.to_markdown(index=False), ""]
        tex.append(_latex(table, layout.title, f"tab:{paper}-{layout.name}"))
    methods = methods_table(df, paper) if paper == "li2022" else pd.DataFrame()
    if not methods.empty:
        title_m = "Li et al. 2022, fine-tuning methods (E2E table layout): trainable parameters and metric per ε"
        md += [f"## {title_m}", "", methods.to_markdown(index=False), ""]
        tex.append(_latex(methods, title_m, f"tab:{paper}-methods"))
    if not main.empty:
        md += ["## Summary: mean ± standard deviation over seeds, paper's value in brackets", "",
               summary(main).to_markdown(index=False), ""]
    sweep = df[df.variant.fillna("") != ""]
    if not sweep.empty:
        grid = sweep.groupby(["task", "model", "method", "eps", "metric", "variant"]).ours.mean()
        md += ["## Grid points (batch size, learning rate, clipping norm, objective), mean over seeds", "",
               grid.reset_index().to_markdown(index=False), ""]
    md += ["## Every run", "", df.astype(object).fillna("").to_markdown(index=False), ""]
    if not df.guarantee_holds.fillna(True).astype(bool).all():
        md += [UNACCOUNTED_NOTE, ""]
    if (df.published.notna() & (df.published_checked == False)).any():  # noqa: E712 (a column of objects)
        md += [UNCHECKED_NOTE, ""]
    write_atomic(md_path, "\n".join(md))
    if tex_path is not None:
        write_atomic(tex_path, "\n\n".join(tex) + "\n")
    return df
