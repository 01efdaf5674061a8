"""What the clipping benchmark measures: the shapes (GPT-2 sizes; all-MiniLM-L6-v2 on one logical SST-2
batch), their models with random weights, their batches and their per-example losses."""
from __future__ import annotations

import os
from pathlib import Path

from privtune.io import read_jsonl

# all-MiniLM-L6-v2's configuration (its config.json), random weights; the batch: one logical SST-2 batch
MINILM_SST2 = dict(arch="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, data="sst2", logical_batch=512, physical_batch=256, physical_tokens=4096,
                   max_length=64)
CPU_SHAPES = {"gpt2-2layer": dict(n_embd=768, n_layer=2, n_head=12), "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
              "minilm-sst2": MINILM_SST2}
GPU_SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
              "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20)}

# Wordpiece lengths ([CLS] and [SEP] included, truncated at 64) of SST-2's 67,349 training sentences under
# all-MiniLM-L6-v2's tokenizer, counted once; entry i is the number of sentences of 3 + i tokens (mean 13.3,
# median 10, 99th percentile 44). The distribution :func:`sst2_lengths` falls back to without the data.
SST2_LENGTH_COUNTS = (1978, 5322, 6065, 5345, 4749, 4155, 3713, 3267, 2947, 2650, 2413, 2138, 1950, 1777, 1661,
                      1515, 1373, 1285, 1132, 1106, 1046, 909, 820, 806, 733, 692, 628, 538, 491, 442, 448, 400,
                      337, 304, 286, 242, 195, 203, 192, 155, 148, 130, 89, 82, 85, 73, 55, 42, 50, 40, 36, 19,
                      21, 22, 15, 8, 6, 3, 2, 5, 5, 5)
LABEL_LENGTH = 6  # "[CLS] it was terrible . [SEP]", "[CLS] it was great . [SEP]"
ROOT = Path(__file__).resolve().parents[3]


# -- the SST-2 batch ------------------------------------------------------------------------------
def approx_wordpieces(text: str, max_length: int = 64) -> int:
    """BERT-uncased wordpieces of a (lower-cased, space-tokenised) SST-2 sentence, approximately: one
    per word of up to 7 characters, one more per further 7. Against all-MiniLM's tokenizer on SST-2's
    training set: mean 13.1 vs 13.3 tokens, mean absolute error 1.3."""
    return min(max_length, 2 + sum(1 + (len(w) - 1) // 7 for w in text.split()))


def _sst2_texts() -> tuple[list[str], str] | None:
    jsonl = ROOT / "results/data/sst2/train.jsonl"
    if jsonl.exists():
        return [r["text_a"] for r in read_jsonl(jsonl)], str(jsonl.relative_to(ROOT))
    dirs = [os.environ.get("PRIVTUNE_DATA_DIR"), ROOT / "resources/data", ROOT.parent / "shared/data"]
    for d in dirs:
        tsv = Path(d) / "glue/SST-2/train.tsv" if d else None
        if tsv is not None and tsv.exists():
            from privtune.data.readers import read_split

            return [r["text_a"] for r in read_split("sst2", "train", d, verify_size=False)], str(tsv)
    return None


def sst2_lengths(max_length: int = 64) -> tuple[list[int], str]:
    """Token lengths of SST-2 training sentences, and where they came from: the prepared training file
    (``results/data/sst2/train.jsonl``) or the raw ``glue/SST-2/train.tsv``, tokenized with
    all-MiniLM's tokenizer when ``results/models/minilm`` is there and with :func:`approx_wordpieces`
    otherwise; without either file, the fixed distribution :data:`SST2_LENGTH_COUNTS`."""
    found = _sst2_texts()
    if found is None:
        lengths = [3 + i for i, n in enumerate(SST2_LENGTH_COUNTS) for _ in range(n)]
        return [min(max_length, n) for n in lengths], "fixed distribution (SST2_LENGTH_COUNTS)"
    texts, where = found
    model_dir = ROOT / "results/models/minilm"
    if (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        return [len(x) for x in ids], f"{where}, all-MiniLM's tokenizer"
    return [approx_wordpieces(t, max_length) for t in texts], f"{where}, approximate wordpieces"


def sst2_batches(spec: dict, dev, batch: int | None = None) -> tuple[list[dict], dict]:
    """One logical SST-2 batch as length-sorted physical batches (random token ids, the real lengths)."""
    import numpy as np
    import torch

    from privtune.dp.sampling import physical_batches

    lengths, source = sst2_lengths(spec.get("max_length", 64))
    rng = np.random.default_rng(0)
    n = batch or spec["logical_batch"]
    pick = rng.choice(len(lengths), size=n, replace=n > len(lengths))
    lens = [int(lengths[i]) for i in pick]
    parts = physical_batches(range(n), lens, spec["physical_batch"], spec["physical_tokens"])
    gen = torch.Generator().manual_seed(0)
    vocab = spec["vocab_size"]
    label_ids = torch.randint(1000, vocab, (2, LABEL_LENGTH), generator=gen)
    label_ids[:, 0], label_ids[:, -1] = 101, 102
    out = []
    for part in parts:
        longest = max(lens[i] for i in part)
        ids = torch.zeros(len(part), longest, dtype=torch.long)
        mask = torch.zeros(len(part), longest, dtype=torch.long)
        for row, i in enumerate(part):
            k = lens[i]
            ids[row, :k] = torch.randint(1000, vocab, (k,), generator=gen)
            ids[row, 0], ids[row, k - 1] = 101, 102  # [CLS], [SEP]; 0 is [PAD]
            mask[row, :k] = 1
        out.append({"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                    "labels": torch.randint(0, 2, (len(part),), generator=gen).to(dev),
                    "label_input_ids": label_ids.to(dev), "label_attention_mask": torch.ones_like(label_ids).to(dev)})
    info = {"lengths_source": source, "mean_length": float(np.mean(lens)), "max_length": max(lens),
            "physical_batches": len(parts), "padded_tokens": sum(len(p) * max(lens[i] for i in p) for p in parts),
            "tokens": sum(lens)}
    return out, info


def lengths(b: dict) -> list[int] | None:
    """Each example's unpadded length (right padding), the engine's hint for skipping padded rows."""
    mask = b.get("attention_mask")
    return None if mask is None else mask.sum(1).tolist()


# -- models, losses, steps ------------------------------------------------------------------------
def arch(spec: dict) -> str:
    return spec.get("arch", "gpt2")


def build_model(shape: dict, untie: bool, device):
    import torch

    torch.manual_seed(0)
    if arch(shape) == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(**{k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "vocab_size")})
        with torch.device(device):  # initialised where it runs (a GPU builds the large shapes in seconds)
            return BertModel(cfg, add_pooling_layer=False)  # the pooler: unused by mean pooling
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**{k: shape[k] for k in ("n_embd", "n_layer", "n_head")}, tie_word_embeddings=not untie)
    with torch.device(device):
        return GPT2LMHeadModel(cfg)



def positions(ids):
    import torch

    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()  # Opacus .view()s it


def _token_losses(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _embed(model, ids, mask):
    """:func:`privtune.objectives.similarity.embed` with explicit (B, T) position and token-type ids
    (Opacus' per-sample hooks need a batch dimension on every layer input)."""
    import torch

    from privtune.objectives.similarity import embed

    return embed(model, ids, mask, position_ids=positions(ids), token_type_ids=torch.zeros_like(ids))


def logits_targets(arch: str, model, b: dict):
    """(logits, targets, shape) of a physical batch: what a criterion of the whole batch takes."""
    import torch

    if arch == "bert":  # the similarity objective: label embeddings are constants of the step
        from privtune.objectives.templates import TEMPERATURE

        with torch.no_grad():
            model.eval()
            labels = _embed(model, b["label_input_ids"], b["label_attention_mask"])
            model.train()
        x = _embed(model, b["input_ids"], b["attention_mask"])
        return x @ labels.to(x.dtype).T / TEMPERATURE, b["labels"], None
    ids = b["input_ids"]
    logits = model(input_ids=ids, position_ids=positions(ids)).logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), logits.shape


def losses(arch: str, model, b: dict):
    """Per-example losses (B,) of a physical batch."""
    import torch.nn.functional as F

    if arch == "bert":
        logits, targets, _ = logits_targets(arch, model, b)
        return F.cross_entropy(logits, targets, reduction="none")
    ids = b["input_ids"]
    return _token_losses(model(input_ids=ids, position_ids=positions(ids)).logits, ids)



def inputs(shape: dict, batch: int, seq: int, dev) -> tuple[list[dict], int, dict]:
    """(physical batches, logical batch size, description of the batch)."""
    import torch

    if arch(shape) == "bert":
        parts, info = sst2_batches(shape, dev)
        return parts, sum(p["input_ids"].shape[0] for p in parts), info
    ids = torch.randint(0, 50257, (batch, seq), device=dev)  # GPT-2's vocabulary
    return [{"input_ids": ids}], batch, {}

