"""Task objectives: encoding, batching, per-example losses and predictions.

* classification / regression (GLUE): the standard sequence-classification
  head; per-example cross-entropy (MSE for STS-B).
* table2text (E2E, DART): a causal LM trained on ``source <sep> target <eos>``
  with the loss on the target tokens only; per-example loss is the mean token
  loss of that example's target. ``<sep>`` is the tokenizer's EOS token (as
  GPT-2's ``<|endoftext|>`` in Li et al.'s "cat" format). A tokenizer with a chat
  template (an instruct model such as SmolLM2-Instruct, whose EOS ``<|im_end|>``
  closes a chat turn) gets its own format instead: the table is a user turn after a
  one-line system instruction (:data:`TABLE2TEXT_INSTRUCTION`), the text is the
  assistant's turn, closed by its end-of-turn token. A bare EOS separator would cue
  the chat template's next turn, and the model would start its text with "assistant".

Per-example losses (shape (B,)) are what DP-SGD clips; the non-private loss is
their mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from privtune.objectives.family import Family

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: object  # int / float label, or list[int] token labels


def encode_classification(tokenizer, records: list[dict], max_length: int) -> list[Encoded]:
    out = []
    for r in records:
        enc = tokenizer(r["text_a"], r.get("text_b"), truncation=True, max_length=max_length)
        out.append(Encoded(enc["input_ids"], r["label"]))
    return out


TABLE2TEXT_INSTRUCTION = "Describe the table in a sentence."


def lm_prompt(tokenizer, source: str) -> list[int]:
    """The prompt of a table: ``source <eos>`` (Li et al.), or the chat format of an instruct model."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": TABLE2TEXT_INSTRUCTION}, {"role": "user", "content": source}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(source, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_table2text(tokenizer, records: list[dict], max_length: int) -> list[Encoded]:
    """One training example per (source, reference) pair."""
    out = []
    for r in records:
        prompt = lm_prompt(tokenizer, r["source"])
        for ref in r["references"]:
            lead = "" if getattr(tokenizer, "chat_template", None) else " "  # a chat turn starts a new line
            target = tokenizer(lead + ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            src = prompt
            if len(src) + len(target) > max_length:  # cut the table, keep its separator and the target
                target = target[: max(1, max_length // 2)] if len(target) > max_length // 2 else target
                src = prompt[: max(0, max_length - len(target) - 1)] + prompt[-1:]
            out.append(Encoded(src + target, [IGNORE] * len(src) + target))
    return out


def training_size(records: list[dict], kind: str) -> int:
    """Training examples (the n of DP accounting) that :func:`encode` makes of ``records``."""
    return sum(len(r["references"]) for r in records) if kind == "table2text" else len(records)


def encode(tokenizer, records: list[dict], kind: str, max_length: int) -> list[Encoded]:
    """Training examples of a task of ``kind`` (table2text: one per reference)."""
    fn = encode_table2text if kind == "table2text" else encode_classification
    return fn(tokenizer, records, max_length)


def pad_right(examples: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T) of ``examples``, right-padded with ``pad_id``."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return ids, mask


def collate(examples: list[Encoded], pad_id: int, kind: str, device) -> dict:
    ids, mask = pad_right(examples, pad_id)
    T = ids.shape[1]
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if kind == "table2text":
        lab = torch.full((len(examples), T), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            lab[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = lab.to(device)
    elif kind == "regression":
        batch["labels"] = torch.tensor([float(e.labels) for e in examples], device=device)
    else:
        batch["labels"] = torch.tensor([int(e.labels) for e in examples], device=device)
    return batch


def per_example_loss(model, batch: dict, kind: str) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits
    if kind == "table2text":
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        counts = (labels != IGNORE).sum(1).clamp_min(1)
        return tok.sum(1) / counts
    if kind == "regression":
        return (logits.squeeze(-1).float() - batch["labels"].float()).pow(2)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


@torch.no_grad()
def predict_labels(model, encoded: list[Encoded], pad_id: int, kind: str, device, batch_size: int = 64) -> list:
    model.eval()
    preds: list = []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i: i + batch_size], pad_id, kind, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds.extend(logits.squeeze(-1).tolist() if kind == "regression" else logits.argmax(-1).tolist())
    return preds


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text holds a line break (GPT-2: ``\\n`` 198, ``\\n\\n`` 628 and longer runs)."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer))
            if i not in special and "\n" in tokenizer.decode([i], clean_up_tokenization_spaces=False)]


@torch.no_grad()
def generate(model, tokenizer, sources: list[str], device, batch_size: int = 16, max_new_tokens: int = 60,
             num_beams: int = 1, length_penalty: float = 1.0, ban_newlines: bool = True) -> list[str]:
    """Batched decoding (greedy, or beam search with ``num_beams`` > 1), left-padded prompts; with
    ``ban_newlines``, no token holding a line break is generated (each output is one line, as Li et
    al.'s decoding bans GPT-2's newline tokens)."""
    model.eval()
    banned = [[i] for i in newline_token_ids(tokenizer)] if ban_newlines else None
    outs: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(sources), batch_size):
        prompts = [lm_prompt(tokenizer, s) for s in sources[i: i + batch_size]]
        T = max(map(len, prompts))
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, T - len(p):] = torch.tensor(p)
            mask[j, T - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                             length_penalty=length_penalty, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad, bad_words_ids=banned or None)
        for row in gen[:, T:]:
            outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outs


class Head(Family):
    """The standard heads (``objective: head``): a new classification or regression head, or a causal LM's
    own head on ``table <sep> text``."""

    def load(self, model_dir: Path):
        from privtune.models.load import load_for_task

        return load_for_task(model_dir, self.obj.kind, self.obj.num_labels)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list[Encoded]:
        return encode(tokenizer, records, self.obj.kind, max_length)

    def collate(self, examples: list[Encoded], pad_id: int, device) -> dict:
        return collate(examples, pad_id, self.obj.kind, device)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return per_example_loss(model, batch, self.obj.kind)

    def predict(self, model, encoded: list[Encoded], pad_id: int, device, batch_size: int = 64) -> list:
        return predict_labels(model, encoded, pad_id, self.obj.kind, device, batch_size)
