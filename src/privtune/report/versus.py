"""Two result trees side by side: every run both hold, tree B against tree A, with its uncertainty.

    python -m privtune.report.versus RESULTS_A RESULTS_B [--labels fp32 bf16] [--out versus.md]

For judging one change on whole presets (a precision, a commit, a library version): run the preset
twice into two folders, then compare. A run is matched by its path under ``results/`` (task, model,
method, variant, ε) and its seed; the headline metric of each matched group of seeds is compared with
:func:`privtune.report.evidence.compare`, B − A, the seeds paired (seed s of A and seed s of B share
their data order, sampling and noise draws, so a bootstrap replicate draws the seeds once for both)
and the evaluation examples paired. Beside each: the difference per seed, the training time of each
side (``train_metrics.json``), and the training settings that differ (``settings`` there). Then each
claim's verdict in both trees (``claims.md``), and the runs only one tree holds, which are listed and
never compared. A group whose runs cannot be paired (evaluated on different examples, or a file that
cannot be read) is listed as not comparable, with the reason, and the rest are still compared. With one
shared seed an interval covers the evaluation examples only (the row says so). BLEU and the other
table-to-text metrics rescore the whole corpus in each replicate: ``--replicates`` trades time for
precision there.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from privtune.io import output_file, read_json, write_atomic
from privtune.report import evidence
from privtune.tasks import TASKS

_SEED = re.compile(r"^seed~(\d+)$")
_VERDICT = re.compile(r"^\| (\([a-z]\)) .* \| \*\*(.+?)\*\* \|$")


@dataclass
class Pair:
    """One group of runs (a path under results/ without its seed) in both trees."""

    cell: str
    metric: str
    seeds: list[int]
    comparison: evidence.Comparison
    per_seed: list[float]  # B − A, seed by seed
    seconds: tuple[list, list]  # training seconds per seed, A and B (None where a run did not train)
    settings: dict[str, tuple]  # setting -> (A's values, B's values), only those that differ
    missing: list[str]  # train_metrics.json files one side lacks (their settings are not compared)


def runs(root: Path) -> dict[str, dict[int, Path]]:
    """Each group's run folders by seed: ``{"li2022/sst2/minilm/full/eps~8": {0: path, ...}}``."""
    out: dict[str, dict[int, Path]] = {}
    for p in sorted(Path(root).glob("**/seed~*/predictions.json")):
        m = _SEED.match(p.parent.name)
        if m:
            out.setdefault(p.parent.parent.relative_to(root).as_posix(), {})[int(m.group(1))] = p.parent
    return out


def verdicts(root: Path) -> dict[str, str] | None:
    """Claim label -> verdict, from the summary table of ``claims.md`` (None where there is none)."""
    path = Path(root) / "claims.md"
    if not path.is_file():
        return None
    return {m.group(1): m.group(2) for line in path.read_text().splitlines() if (m := _VERDICT.match(line))}


def _predictions(path: Path) -> evidence.RunPredictions:
    try:
        run = evidence.read_predictions(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable predictions.json ({type(e).__name__}: {e}); rerun its "
                         "evaluation (snakemake --forcerun evaluate)") from e
    if run.task not in TASKS:
        raise ValueError(f"{path}: task {run.task!r} is not a registered task")
    return run


def _trained(folder: Path) -> dict | None:
    """The run's ``train_metrics.json``, or None where it has none."""
    f = folder / "train_metrics.json"
    return read_json(f) if f.is_file() else None


_ABSENT = "(absent)"


def _text(settings: dict, key: str) -> str:
    return str(settings[key]).replace("|", "\\|") if key in settings else _ABSENT


def pair(cell: str, a: dict[int, Path], b: dict[int, Path], replicates: int | None = None) -> Pair:
    """Tree B's runs of ``cell`` against tree A's, on the seeds both hold."""
    seeds = sorted(set(a) & set(b))
    pa = [_predictions(a[s] / "predictions.json") for s in seeds]
    pb = [_predictions(b[s] / "predictions.json") for s in seeds]
    for s, x, y in zip(seeds, pa, pb):
        if x.task != y.task or x.labels != y.labels:
            raise ValueError(f"{cell}/seed~{s}: the two trees evaluated on different examples "
                             f"({a[s]} and {b[s]}); a paired comparison needs the same evaluation set")
    metric = TASKS[pa[0].task].main_metric
    comparison = evidence.compare(pb, pa, metric, replicates=replicates, paired_seeds=True)
    per_seed = [y - x for x, y in zip(comparison.points_b, comparison.points_a)]  # compare's a is tree B
    ta = [_trained(a[s]) for s in seeds]
    tb = [_trained(b[s]) for s in seeds]
    missing = [str(root[s] / "train_metrics.json") for s, x, y in zip(seeds, ta, tb)
               for root, t in ((a, x), (b, y)) if t is None]
    differ: dict[str, tuple] = {}
    for x, y in zip(ta, tb):
        if x is None or y is None:
            continue
        sx, sy = x.get("settings") or {}, y.get("settings") or {}
        for k in sorted(set(sx) | set(sy)):
            if k != "seed" and (k in sx, sx.get(k)) != (k in sy, sy.get(k)):
                old = differ.get(k, ([], []))
                differ[k] = (sorted({*old[0], _text(sx, k)}), sorted({*old[1], _text(sy, k)}))
    return Pair(cell, metric, seeds, comparison, per_seed, ([_seconds(x) for x in ta], [_seconds(y) for y in tb]),
                differ, missing)


def _seconds(metrics: dict | None) -> float | None:
    """Training seconds, None for a run that did not train (zero-shot) or has no train_metrics.json."""
    if not metrics or not metrics.get("steps") or (metrics.get("settings") or {}).get("zero_shot"):
        return None
    return metrics.get("seconds")


def _times(values: list) -> str:
    return ", ".join("—" if v is None else f"{v:.0f}" for v in values)


def markdown(pairs: list[Pair], only: tuple[list[str], list[str]], claims: tuple[dict | None, dict | None],
             labels: tuple[str, str], refused: list[str] = ()) -> str:
    la, lb = labels
    level = int(evidence.LEVEL * 100)
    lines = [f"# {lb} against {la}", "",
             f"Every run both trees hold, matched by its path and seed; {lb} − {la} on the task's headline "
             f"metric (mean over the shared seeds) with its {level} % paired bootstrap interval (the seeds "
             "and the evaluation examples drawn once for both trees; with one seed the interval covers the "
             "evaluation examples only; privtune.report.versus).", "",
             f"| run | metric | seeds | {la} | {lb} | {lb} − {la} [{level} %] | per seed | training s, {la} → {lb} "
             "| settings that differ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        c = p.comparison
        differ = "; ".join(f"{k}: {'/'.join(v[0])} → {'/'.join(v[1])}" for k, v in p.settings.items()) or "—"
        times = ("—" if all(v is None for v in p.seconds[0] + p.seconds[1])
                 else f"{_times(p.seconds[0])} → {_times(p.seconds[1])}")
        seeds = ", ".join(map(str, p.seeds)) + (" (examples only)" if len(p.seeds) == 1 else "")
        lines.append(f"| {p.cell} | {p.metric} | {seeds} | {c.b:.2f} | {c.a:.2f} | "
                     f"{c.diff:+.2f} [{c.low:+.2f}, {c.high:+.2f}] | {' / '.join(f'{d:+.2f}' for d in p.per_seed)} "
                     f"| {times} | {differ} |")
    va, vb = claims
    if va is not None or vb is not None:
        lines += ["", "## Verdicts", "", f"| claim | {la} | {lb} | |", "|---|---|---|---|"]
        for k in sorted(set(va or {}) | set(vb or {})):
            x = "no claims.md" if va is None else va.get(k, "—")
            y = "no claims.md" if vb is None else vb.get(k, "—")
            same = "same" if x == y else ("not compared" if va is None or vb is None else "**changed**")
            lines.append(f"| {k} | {x} | {y} | {same} |")
    for label, cells in zip(labels, only):
        if cells:
            lines += ["", f"Only in {label} (not compared): " + "; ".join(cells)]
    if refused:
        lines += ["", "Not comparable:", *(f"- {r}" for r in refused)]
    missing = [m for p in pairs for m in p.missing]
    if missing:
        lines += ["", "No train_metrics.json (time and settings not compared): " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def versus(root_a: Path, root_b: Path, labels: tuple[str, str] = ("A", "B"), replicates: int | None = None) -> str:
    a, b = runs(root_a), runs(root_b)
    if not a or not b:
        empty = root_a if not a else root_b
        raise FileNotFoundError(f"{empty}: no run with predictions.json under it; give the results/ folder "
                                "of an evaluated preset")
    pairs, only_a, only_b, refused = [], [], [], []
    for cell in sorted(set(a) | set(b)):
        sa, sb = a.get(cell, {}), b.get(cell, {})
        for only, seeds in ((only_a, set(sa) - set(sb)), (only_b, set(sb) - set(sa))):
            if seeds:
                only.append(f"{cell} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))})")
        if set(sa) & set(sb):
            try:
                pairs.append(pair(cell, sa, sb, replicates))
            except ValueError as e:  # this group only: the others are still compared
                refused.append(f"{cell}: {e}")
    if not pairs and refused:
        raise ValueError("no group of runs could be compared:\n" + "\n".join(refused))
    return markdown(pairs, (only_a, only_b), (verdicts(root_a), verdicts(root_b)), labels, refused)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="the reference tree (a preset's results/ folder)")
    ap.add_argument("b", type=Path, help="the tree compared against it")
    ap.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("A", "B"))
    ap.add_argument("--replicates", type=int, default=None, help="bootstrap replicates (default: evidence's)")
    ap.add_argument("--out", type=output_file("versus.md"), help="write the markdown here (default: standard output)")
    args = ap.parse_args(argv)
    try:
        text = versus(args.a, args.b, tuple(args.labels), args.replicates)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
