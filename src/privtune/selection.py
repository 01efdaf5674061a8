"""Choosing hyperparameters on a validation split carved from the training data, never on the reported set.

A seeded random ``--val-size`` examples of the task's training split are held out as the validation set;
each candidate (a JSON object of training settings over ``--base``) trains on the rest, or on its first
``train_size`` examples, and is scored on the held-out examples with the task's headline metric. The
evaluation split the tables report is not read. The result, one row per candidate with its validation
score and the 95 % bootstrap interval over the held-out examples, goes to ``--out`` (JSON) and stdout.

This is how the quick preset's SST-2 settings were chosen::

    python -m privtune.selection --task sst2 --model results/models/minilm --val-size 1000 \\
        --base '{"objective": "prompt", "max_length": 64, "physical_tokens": 4096, "threads": 1}' \\
        --candidate '{"zero_shot": true}' \\
        --candidate '{"epsilon": 8, "batch_size": 4000, "physical_batch_size": 256, "steps": 4, "lr": 5e-4}' \\
        --candidate '{"epsilon": 8, "batch_size": 4000, "physical_batch_size": 256, "steps": 4, "lr": 1e-4}' \\
        --out results/selection/sst2.json

A candidate may name ``train_size`` (the first that many of the remaining examples) and ``seed``.
Under DP each candidate is a separate release of the training data: selection costs privacy that no
candidate's ε includes (Papernot & Steinke, ICLR 2022), so choose on data you may spend, or on public data.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from privtune import tasks
from privtune.dp import guarantee
from privtune.io import output_file, write_json, write_jsonl

SEED = 12345  # the carve's generator


def carve(records: list[dict], val_size: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(training rest, validation): ``val_size`` records drawn at random with ``seed``, disjoint from the rest."""
    if not 0 < val_size < len(records):
        raise ValueError(f"--val-size must be between 1 and {len(records) - 1} (the training split has "
                         f"{len(records)} examples), got {val_size}")
    perm = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in perm[val_size:]], [records[i] for i in perm[:val_size]]


def select(task: str, model_dir: Path, records: list[dict], val_size: int, base: dict, candidates: list[dict],
           work: Path, seed: int = SEED) -> list[dict]:
    from privtune.evaluate import evaluate
    from privtune.training.loop import RunSettings, run

    info = tasks.task_info(task)
    rest, val = carve(records, val_size, seed)
    write_jsonl(work / "validation.jsonl", val)
    main = tasks.task(task).main_metric
    rows = []
    for i, cand in enumerate(candidates):
        cand = dict(cand)
        size = cand.pop("train_size", None)
        train_file = work / f"train_{i}.jsonl"
        write_jsonl(train_file, rest[:size] if size else rest)
        s = {"kind": info["kind"], "num_labels": info["num_labels"], "task": task, **base, **cand}
        s["sampling"] = guarantee.sampling_scheme(s.get("sampling"), s.get("epsilon") is not None)
        out = work / f"run_{i}"
        trained = run(RunSettings(**s), model_dir, train_file, out, progress=False)
        row = evaluate(out, work / "validation.jsonl", out / "metrics.json", info["kind"], task,
                       {"paper": "", "model": "", "method": "", "variant": "", "eps": "", "seed": s.get("seed", 0)})
        rows.append({"candidate": {**cand, **({"train_size": size} if size else {})}, "metric": main,
                     "validation": row["metrics"][main], "interval": row["intervals"].get(main),
                     "epsilon": trained["privacy"].get("epsilon"), "train_examples": len(rest[:size] if size else rest),
                     "validation_examples": len(val)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    from privtune.data.readers import read_split

    ap = argparse.ArgumentParser(prog="python -m privtune.selection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--model", required=True, type=Path, help="a prepared model folder")
    ap.add_argument("--data-dir", type=Path, default=None, help="raw data (default: $PRIVTUNE_DATA_DIR)")
    ap.add_argument("--split", default="train", help="the split to carve from (default: train)")
    ap.add_argument("--val-size", type=int, required=True)
    ap.add_argument("--base", default="{}", help="settings every candidate shares (JSON)")
    ap.add_argument("--candidate", action="append", required=True, help="one candidate's settings (JSON)")
    ap.add_argument("--out", type=output_file("selection.json"))
    a = ap.parse_args(argv)
    import os

    data_dir = a.data_dir or Path(os.environ.get("PRIVTUNE_DATA_DIR", "resources/data"))
    records = read_split(a.task, a.split, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rows = select(a.task, a.model, records, a.val_size, json.loads(a.base),
                      [json.loads(c) for c in a.candidate], Path(tmp))
    if a.out:
        write_json(a.out, rows)


if __name__ == "__main__":
    main()
