"""The evaluation stage: a trained run on its evaluation split; writes metrics.json (one row of the tables).

The objective, its prompt, the label count and the input length are the run's own (its
``train_metrics.json`` settings), so a run is evaluated as it was trained; the metrics are the
task registry's (:mod:`privtune.tasks`) unless ``metrics`` names a subset."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from privtune import tasks
from privtune.io import read_json, read_jsonl, write_atomic, write_json
from privtune.models import methods
from privtune.models.load import default_device, load_tokenizer
from privtune.objectives import head, objective
from privtune.objectives.tokenised import encode_file
from privtune.report import evidence


def evaluate(run_dir: Path, eval_file: Path, out_file: Path, kind: str, task: str, meta: dict,
             generation: dict | None = None, metrics: list[str] | None = None, threads: int | None = None,
             mismatched_file: Path | None = None) -> dict:
    """Metrics of the run in ``run_dir`` on ``eval_file``, written to ``out_file`` (one table row).

    ``mismatched_file`` (MNLI): a second evaluation set whose accuracy is reported as ``accuracy_mm``.
    """
    from privtune.metrics import classification_metrics, generation_metrics

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    device = default_device()
    tok = load_tokenizer(run_dir / "model")
    train = read_json(run_dir / "train_metrics.json")
    s = train["settings"]
    obj = objective(kind, task, s["objective"], s["num_labels"], s["prompt"], model_dir=run_dir / "model")
    # a prefix-tuned run keeps its prefix as a peft adapter beside the base weights
    model = methods.attach_adapter(obj.load(run_dir / "model"), run_dir / "model").to(device)
    obj.prepare(model, tok, device, run_dir / "model")  # the label embeddings the run trained against
    records, mismatched = read_jsonl(eval_file), None
    t0 = time.perf_counter()
    if kind == "table2text":
        g = dict(generation or {})
        hyps = head.generate(model, tok, [r["source"] for r in records], device, **g)
        write_atomic(Path(out_file).with_name("predictions.txt"), "".join(h.replace("\n", " ") + "\n" for h in hyps))
        preds, labels = hyps, [r["references"] for r in records]
        scores = generation_metrics(preds, labels, metrics=tuple(metrics or tasks.task(task).metrics))
    else:
        def predict(path):
            return obj.predict(model, encode_file(obj, tok, path, s["max_length"]), tok.pad_token_id, device)

        preds, labels = predict(eval_file), [r["label"] for r in records]
        scores = classification_metrics(task, preds, labels)
        if mismatched_file is not None:
            mismatched = read_jsonl(mismatched_file)
            scores["accuracy_mm"] = classification_metrics(task, predict(mismatched_file),
                                                           [r["label"] for r in mismatched])["accuracy"]
    # per-example predictions on the (public) evaluation set, beside metrics.json: the claims report's paired
    # bootstrap reads them
    run_id = {k: {**meta, "task": task}.get(k, "") for k in evidence.RUN_KEY}
    write_json(Path(out_file).with_name("predictions.json"),
               {"task": task, "run": run_id, "predictions": preds, "labels": labels})
    main = tasks.task(task).main_metric
    # the headline metric's 95 % interval over the evaluation examples (the figures' error bars for one seed)
    intervals = {main: evidence.interval(evidence.RunPredictions(task, preds, labels), main)} if main in scores else {}
    privacy = read_json(run_dir / "privacy.json")
    eps = privacy.get("epsilon")
    row = {
        **meta,
        "task": task,
        "objective": s["objective"],
        "objective_family": obj.family,
        "metrics": scores,
        "intervals": intervals,
        "epsilon_spent": None if eps is None or (isinstance(eps, float) and math.isinf(eps)) else eps,
        "delta": privacy.get("delta"),
        "noise_multiplier": privacy.get("noise_multiplier", 0.0),
        "clip_norm": s["clip_norm"],
        "train_batch_size": privacy.get("expected_batch_size"),
        "dataset_size": privacy.get("dataset_size"),
        "trainable_parameters": train["trainable_parameters"],
        # the noise norm of each averaged update as σ implies it; data statistics stay out (privtune.dp.guarantee)
        "noise_norm": train.get("noise_norm_expected"),
        "guarantee_holds": bool(privacy.get("guarantee_holds", True)),
        "train_seconds": train["seconds"],
        "eval_seconds": time.perf_counter() - t0,
        "eval_examples": len(records),
        **({"eval_examples_mm": len(mismatched)} if mismatched is not None else {}),
    }
    write_json(out_file, row)
    return row
