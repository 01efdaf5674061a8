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
never compared.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privtune.io import read_json, write_atomic
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


def runs(root: Path) -> dict[str, dict[int, Path]]:
    """Each group's run folders by seed: ``{"li2022/sst2/minilm/full/eps~8": {0: path, ...}}``."""
    out: dict[str, dict[int, Path]] = {}
    for p in sorted(Path(root).glob("**/seed~*/predictions.json")):
        m = _SEED.match(p.parent.name)
        if m:
            out.setdefault(p.parent.parent.relative_to(root).as_posix(), {})[int(m.group(1))] = p.parent
    return out


def verdicts(root: Path) -> dict[str, str]:
    """Claim label -> verdict, from the summary table of ``claims.md`` (empty where there is none)."""
    path = Path(root) / "claims.md"
    if not path.is_file():
        return {}
    return {m.group(1): m.group(2) for line in path.read_text().splitlines() if (m := _VERDICT.match(line))}


def _settings(folder: Path) -> dict:
    f = folder / "train_metrics.json"
    return read_json(f) if f.is_file() else {}


def pair(cell: str, a: dict[int, Path], b: dict[int, Path], replicates: int | None = None) -> Pair:
    """Tree B's runs of ``cell`` against tree A's, on the seeds both hold."""
    seeds = sorted(set(a) & set(b))
    pa = [evidence.read_predictions(a[s] / "predictions.json") for s in seeds]
    pb = [evidence.read_predictions(b[s] / "predictions.json") for s in seeds]
    for s, x, y in zip(seeds, pa, pb):
        if x.task != y.task or x.labels != y.labels:
            raise ValueError(f"{cell}/seed~{s}: the two trees evaluated on different examples "
                             f"({a[s]} and {b[s]}); a paired comparison needs the same evaluation set")
    metric = TASKS[pa[0].task].main_metric
    comparison = evidence.compare(pb, pa, metric, replicates=replicates, paired_seeds=True)
    full = np.arange(pa[0].n)[None, :]
    per_seed = [float(evidence.score(y, metric, full)[0] - evidence.score(x, metric, full)[0])
                for x, y in zip(pa, pb)]
    ta = [_settings(a[s]) for s in seeds]
    tb = [_settings(b[s]) for s in seeds]
    differ: dict[str, tuple] = {}
    for x, y in zip(ta, tb):
        sx, sy = x.get("settings") or {}, y.get("settings") or {}
        for k in sorted(set(sx) | set(sy)):
            if k != "seed" and sx.get(k) != sy.get(k):
                old = differ.get(k, ([], []))
                differ[k] = (sorted({*old[0], str(sx.get(k))}), sorted({*old[1], str(sy.get(k))}))
    return Pair(cell, metric, seeds, comparison, per_seed,
                ([x.get("seconds") for x in ta], [y.get("seconds") for y in tb]), differ)


def _seconds(values: list) -> str:
    return ", ".join("—" if v is None else f"{v:.0f}" for v in values)


def markdown(pairs: list[Pair], only: tuple[list[str], list[str]], claims: tuple[dict, dict],
             labels: tuple[str, str]) -> str:
    la, lb = labels
    lines = [f"# {lb} against {la}", "",
             f"Every run both trees hold, matched by its path and seed; {lb} − {la} on the task's headline "
             f"metric (mean over the shared seeds) with its {int(evidence.LEVEL * 100)} % paired bootstrap "
             "interval (seeds and evaluation examples drawn once for both trees; privtune.report.versus).", "",
             f"| run | metric | seeds | {la} | {lb} | {lb} − {la} [95 %] | per seed | training s, {la} → {lb} "
             "| settings that differ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        c = p.comparison
        differ = "; ".join(f"{k}: {'/'.join(v[0])} → {'/'.join(v[1])}" for k, v in p.settings.items()) or "—"
        times = ("—" if all(v is None for v in p.seconds[0] + p.seconds[1])
                 else f"{_seconds(p.seconds[0])} → {_seconds(p.seconds[1])}")
        lines.append(f"| {p.cell} | {p.metric} | {', '.join(map(str, p.seeds))} | {c.b:.2f} | {c.a:.2f} | "
                     f"{c.diff:+.2f} [{c.low:+.2f}, {c.high:+.2f}] | {' / '.join(f'{d:+.2f}' for d in p.per_seed)} "
                     f"| {times} | {differ} |")
    va, vb = claims
    if va or vb:
        lines += ["", "## Verdicts", "", f"| claim | {la} | {lb} | |", "|---|---|---|---|"]
        for k in sorted(set(va) | set(vb)):
            x, y = va.get(k, "—"), vb.get(k, "—")
            lines.append(f"| {k} | {x} | {y} | {'same' if x == y else '**changed**'} |")
    for label, cells in zip(labels, only):
        if cells:
            lines += ["", f"Only in {label} (not compared): " + ", ".join(cells)]
    return "\n".join(lines) + "\n"


def versus(root_a: Path, root_b: Path, labels: tuple[str, str] = ("A", "B"), replicates: int | None = None) -> str:
    a, b = runs(root_a), runs(root_b)
    if not a or not b:
        empty = root_a if not a else root_b
        raise FileNotFoundError(f"{empty}: no run with predictions.json under it; give the results/ folder "
                                "of an evaluated preset")
    pairs, only_a, only_b = [], [], []
    for cell in sorted(set(a) | set(b)):
        sa, sb = a.get(cell, {}), b.get(cell, {})
        only_a += [f"{cell}/seed~{s}" for s in sorted(set(sa) - set(sb))]
        only_b += [f"{cell}/seed~{s}" for s in sorted(set(sb) - set(sa))]
        if set(sa) & set(sb):
            pairs.append(pair(cell, sa, sb, replicates))
    return markdown(pairs, (only_a, only_b), (verdicts(root_a), verdicts(root_b)), labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="the reference tree (a preset's results/ folder)")
    ap.add_argument("b", type=Path, help="the tree compared against it")
    ap.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("A", "B"))
    ap.add_argument("--replicates", type=int, default=None, help="bootstrap replicates (default: evidence's)")
    ap.add_argument("--out", type=Path, help="write the markdown here (default: standard output)")
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
