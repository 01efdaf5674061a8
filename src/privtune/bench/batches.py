"""Throughput of DP training with padded against length-sorted physical batches.

One DP-Adam step (ghost clipping, noise, Adam) on the same logical batch, split two ways:
consecutive slices of ``--physical`` examples, each padded to its longest example (what
``physical_tokens: null`` does), and length-sorted physical batches under a token budget
(``physical_tokens``). The two are alternated in one process, each round on a fresh logical
batch shared by both, so drift on a shared machine cancels in the ratio. Writes a JSON with
the examples per second of each and the median ratio::

    python -m privtune.bench.batches --model results/models/minilm --train results/data/sst2/train.jsonl \\
        --out results/benchmarks/physical_batches_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from privtune.dp.engine import GhostClipEngine
from privtune.dp.noise import privatize_
from privtune.training.optim import build_optimizer
from privtune.dp.sampling import physical_batches
from privtune.io import output_file, read_jsonl, write_json
from privtune.models.load import load_tokenizer
from privtune.objectives import objective


def measure(model_dir: Path, train_file: Path, task: str = "sst2", batch: int = 512, physical: int = 64,
            tokens: int = 4096, rounds: int = 3, max_length: int = 64, seed: int = 0,
            prompt: dict | None = None) -> dict:
    obj = objective("classification", task, "prompt", 2, prompt or {}, model_dir=model_dir)
    tok = load_tokenizer(model_dir)
    model = obj.load(model_dir).train()
    data = obj.encode(tok, read_jsonl(train_file), max_length)
    lengths = [len(e.input_ids) for e in data]
    engine = GhostClipEngine(model, clip_norm=0.1)
    opt = build_optimizer("adam", engine.params, 1e-6)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    modes = {"padded": (physical, None), "length_sorted": (max(physical, 256), tokens)}

    def step(idx, max_examples, max_tokens) -> float:
        t0 = time.perf_counter()
        for part in physical_batches(idx, lengths, max_examples, max_tokens):
            b = obj.collate([data[i] for i in part], tok.pad_token_id, "cpu")
            with engine.capture(batch_size=len(part), lengths=[lengths[i] for i in part]):
                losses = obj.loss(model, b)
            engine.backward(losses)
        privatize_(engine.params, 0.6, 0.1, len(idx), gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    warm = rng.choice(len(data), size=min(batch, len(data)), replace=False)
    for m in modes.values():
        step(warm, *m)
    times = {k: [] for k in modes}
    tokens_run = {k: 0 for k in modes}  # padded tokens through the model: the bound on the speed-up
    for _ in range(rounds):
        idx = rng.choice(len(data), size=min(batch, len(data)), replace=False)
        for k, m in modes.items():
            times[k].append(step(idx, *m))
            tokens_run[k] += sum(len(p) * max(lengths[i] for i in p) for p in physical_batches(idx, lengths, *m))
    n = min(batch, len(data))
    per_round = [p / s for p, s in zip(times["padded"], times["length_sorted"])]
    return {"task": task, "model": str(model_dir), "logical_batch": n, "padded_physical_batch": physical,
            "physical_tokens": tokens, "rounds": rounds, "threads": torch.get_num_threads(),
            "mean_length": float(np.mean(lengths)), "max_length": max(lengths),
            "examples_per_s": {k: n / statistics.median(v) for k, v in times.items()},
            "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
            "speedup_median": statistics.median(per_round), "speedup_per_round": per_round,
            # padded tokens of the padded split over those of the length-sorted one: what sorting can save
            "padded_tokens_ratio": tokens_run["padded"] / tokens_run["length_sorted"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m privtune.bench.batches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--physical", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=output_file("physical_batches.json"),
                    default=Path("results/benchmarks/physical_batches_cpu.json"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.model, a.train, a.task, a.batch, a.physical, a.tokens, a.rounds)
    write_json(a.out, r)
    print(f"padded: {r['examples_per_s']['padded']:.1f} examples/s; length-sorted: "
          f"{r['examples_per_s']['length_sorted']:.1f} examples/s; speed-up {r['speedup_median']:.2f}x "
          f"(median of {a.rounds} rounds; padded tokens {r['padded_tokens_ratio']:.2f}x fewer when sorted)")


if __name__ == "__main__":
    main()
