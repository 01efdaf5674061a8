"""The pre-training-aligned classification objective for causal LMs (GPT-2, Llama, SmolLM2).

Each example is written into a plain-text template that ends just before the label word;
the label is the next token. The per-example loss is the cross-entropy over the label
words' next-token logits at the last prompt position, and only that position goes
through the LM head (one (B, 1, d) hidden state per example, not (B, T, V) logits).
The head is called as a module, so the ghost-clipping engine hooks it (it is tied to
the word embedding in GPT-2 and SmolLM2; the engine sums both uses).

Templates and label words (``{a}`` = ``text_a``, ``{b}`` = ``text_b``), in label-id order:

| task | template | label words |
|------|----------|-------------|
| sst2 | ``Review: {a}\\nSentiment:`` | `` negative``, `` positive`` |
| cola | ``Sentence: {a}\\nGrammatical:`` | `` no``, `` yes`` |
| mnli | ``Premise: {a}\\nHypothesis: {b}\\nEntailment:`` | `` yes``, `` maybe``, `` no`` |
| qnli | ``Question: {a}\\nSentence: {b}\\nAnswered:`` | `` yes``, `` no`` |
| rte  | ``Premise: {a}\\nHypothesis: {b}\\nEntailment:`` | `` yes``, `` no`` |
| mrpc | ``Sentence 1: {a}\\nSentence 2: {b}\\nSame meaning:`` | `` no``, `` yes`` |
| qqp  | ``Question 1: {a}\\nQuestion 2: {b}\\nSame question:`` | `` no``, `` yes`` |

The SST-2 template was chosen by its zero-shot accuracy on SmolLM2-135M-Instruct: a
template ending in "It was" (LM-BFF's masked-LM template, made causal) scores near
chance there, this one well above it. ``prompt: {template, label_words}`` in an
experiment overrides both. Each label word must be one token of the model's tokenizer
(else a ValueError naming it). A text too long for ``max_length`` loses tokens from the
end of its longest sentence; the template's fixed text and the position of the label are
never cut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privtune.objectives.head import Encoded, pad_right
from privtune.objectives.family import Family
from privtune.objectives.templates import CAUSAL_TEMPLATES as TEMPLATES  # noqa: F401 (the causal templates, re-exported)
from privtune.objectives.templates import CausalSpec, spec_for  # noqa: F401

@dataclass
class CausalEncoded(Encoded):
    label_word_ids: tuple[int, ...]


def label_word_ids(tokenizer, spec: CausalSpec, task: str) -> tuple[int, ...]:
    ids = []
    for word in spec.label_words:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"task {task!r}: label word {word!r} is {len(toks)} tokens "
                             f"{tokenizer.convert_ids_to_tokens(toks)} for {type(tokenizer).__name__}; the "
                             "causal prompt objective needs single-token label words (prompt.label_words)")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task!r}: label words {spec.label_words} share token ids {ids}")
    return tuple(ids)


_FIELD = re.compile(r"\{([ab])\}")


def encode(tokenizer, records: list[dict], task: str, max_length: int, spec: CausalSpec) -> list[CausalEncoded]:
    """Template-filled prompts (no special tokens: the label word is predicted after the last token)."""
    words = label_word_ids(tokenizer, spec, task)
    pieces = _FIELD.split(spec.template)  # literal, field, literal, field, ...
    fixed = {i: tokenizer(p, add_special_tokens=False)["input_ids"] for i, p in enumerate(pieces) if i % 2 == 0}
    budget = max_length - sum(map(len, fixed.values()))
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the sentences of template {spec.template!r}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id else []
    out = []
    for r in records:
        fields = {}
        for i in range(1, len(pieces), 2):
            key = "text_a" if pieces[i] == "a" else "text_b"
            if r.get(key) is None:
                raise ValueError(f"template {spec.template!r} needs {key!r}, which this record lacks: {r}")
            fields[i] = tokenizer(r[key], add_special_tokens=False)["input_ids"]
        lengths = {i: len(t) for i, t in fields.items()}
        while sum(lengths.values()) > budget - len(bos):
            j = max(lengths, key=lengths.get)
            lengths[j] -= 1
        ids = list(bos)
        for i in range(len(pieces)):
            ids += fixed[i] if i % 2 == 0 else fields[i][: lengths[i]]
        label = r.get("label")
        if label is not None and not (isinstance(label, int) and 0 <= label < len(words)):
            raise ValueError(f"task {task!r}: label {label!r} is not a class id in [0, {len(words)})")
        out.append(CausalEncoded(ids, label, words))
    return out


def collate(examples: list[CausalEncoded], pad_id: int, device) -> dict:
    ids, mask = pad_right(examples, pad_id)
    labels = torch.tensor([-1 if e.labels is None else int(e.labels) for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "last_pos": (mask.sum(1) - 1).to(device),
            "label_word_ids": torch.tensor(examples[0].label_word_ids).to(device)}


def load(model_dir: Path, dtype=torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from privtune.models.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(model_dir).pad_token_id
    return model


def label_word_logits(model: nn.Module, batch: dict) -> Tensor:
    """Next-token logits of the label words after each prompt's last token, (B, K)."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, batch["last_pos"]].unsqueeze(1)  # (B, 1, d)
    logits = model.get_output_embeddings()(last)[:, 0]  # (B, V): one position per example
    return logits.index_select(-1, batch["label_word_ids"])


def per_example_loss(model: nn.Module, batch: dict) -> Tensor:
    logits = label_word_logits(model, batch)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, batch["labels"], reduction="none")


class NextToken(Family):
    """The prompt objective on a causal LM: label words scored as the token after the template."""

    def load(self, model_dir: Path) -> nn.Module:
        return load(model_dir)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list[CausalEncoded]:
        return encode(tokenizer, records, self.obj.task, max_length, spec_for(self.obj.task, self.obj.prompt))

    def collate(self, examples: list[CausalEncoded], pad_id: int, device) -> dict:
        return collate(examples, pad_id, device)

    def loss(self, model, batch: dict) -> Tensor:
        return per_example_loss(model, batch)

    def logits(self, model, batch: dict) -> Tensor:
        return label_word_logits(model, batch)
