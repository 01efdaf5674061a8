"""The pre-training-aligned classification objective for sentence encoders without an LM head
(all-MiniLM-L6-v2 and other sentence-transformers exports).

A sentence encoder was pre-trained to place texts of like meaning close together, so the
aligned way to classify with it is to compare the input with a short description of each
label: logits are the cosine similarities between the mean-pooled embedding of the input
and of each label's description, divided by a temperature τ (``prompt.temperature``,
default 0.05, the scale-20 convention of contrastive sentence-embedding training). The
per-example loss is the cross-entropy over those logits. No parameter is added.

Label descriptions, in label-id order (``prompt.descriptions`` overrides them):

| task | descriptions |
|------|--------------|
| sst2 | "It was terrible.", "It was great." |
| cola | "This sentence is ungrammatical.", "This sentence is grammatical." |

Pair tasks (NLI, paraphrase) are not a similarity to a fixed description and are refused.

Label embeddings (``prompt.anchors``):

- ``fixed`` (the default): embedded **once**, by the prepared encoder before the first step, in eval
  mode and without gradient, and kept for the whole run and its evaluation (saved beside the
  weights as ``label_anchors.pt``). The anchors cannot drift or collapse onto each other however the
  encoder moves, so every step pulls each input towards a fixed, well-separated target. They read
  no training example (the descriptions are fixed public text, the encoder is the public
  pre-trained one), so they cost no privacy.
- ``live``: re-embedded each step by the current encoder, without gradient. Nothing then keeps
  them apart: their cosine can rise towards 1 as the encoder is trained, and accuracy with it
  falls to chance. Kept to reproduce that failure.

Either way the label embeddings are constants of the step: the engine's hooks record nothing while
gradients are off, each example's loss depends on the trainable parameters only through that
example's own forward pass, and the per-example gradient that is clipped is the exact gradient of
that loss with the label embeddings held fixed: the sensitivity stays C.

The training log records, each step, the cosine between the label descriptions' embeddings under
the *current* parameters (``anchor_cosine``: a function of the parameters alone, so free to
record under DP): it shows how far a ``live`` objective has drifted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privtune.objectives.head import Encoded, pad_right
from privtune.objectives.family import Family
from privtune.objectives.templates import DESCRIPTIONS, TEMPERATURE, descriptions_for  # noqa: F401 (re-exported)

@dataclass
class SimilarityEncoded(Encoded):
    label_ids: tuple[tuple[int, ...], ...]  # the descriptions' token ids


def encode(tokenizer, records: list[dict], task: str, max_length: int, descriptions, num_labels: int
           ) -> list[SimilarityEncoded]:
    if len(descriptions) != num_labels:
        raise ValueError(f"task {task!r}: {len(descriptions)} label descriptions for {num_labels} labels")
    if any(r.get("text_b") is not None for r in records):
        raise ValueError(f"task {task!r} has sentence pairs; the similarity objective takes single sentences")
    labels = tuple(tuple(tokenizer(d, truncation=True, max_length=max_length)["input_ids"]) for d in descriptions)
    texts = [r["text_a"] for r in records]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    out = []
    for r, x in zip(records, ids):
        label = r.get("label")
        if label is not None and not (isinstance(label, int) and 0 <= label < num_labels):
            raise ValueError(f"task {task!r}: label {label!r} is not a class id in [0, {num_labels})")
        out.append(SimilarityEncoded(list(x), label, labels))
    return out


def collate(examples: list[SimilarityEncoded], pad_id: int, device) -> dict:
    ids, mask = pad_right(examples, pad_id)
    label_ids, label_mask = pad_right([Encoded(list(t), None) for t in examples[0].label_ids], pad_id)
    labels = torch.tensor([-1 if e.labels is None else int(e.labels) for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "label_input_ids": label_ids.to(device), "label_attention_mask": label_mask.to(device)}


def load(model_dir: Path, dtype=torch.float32) -> nn.Module:
    """The bare encoder; BERT's pooler is left out (mean pooling does not use it, so it would only
    receive noise)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
    return AutoModel.from_pretrained(model_dir, dtype=dtype, **kwargs)


def embed(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, **model_inputs) -> Tensor:
    """Unit-norm mean-pooled embeddings (B, d); ``model_inputs`` go to the model as well."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, **model_inputs).last_hidden_state
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return F.normalize(pooled.to(torch.promote_types(pooled.dtype, torch.float32)), dim=-1)


ANCHORS_FILE = "label_anchors.pt"  # the fixed label embeddings, in the run's model folder
_ATTR = "privtune_label_anchors"  # where a model holds its fixed label embeddings


@torch.no_grad()
def _frozen_embed(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Embeddings in eval mode and without gradient: constants of a step (no training example reaches them)."""
    was_training = model.training
    model.eval()
    out = embed(model, input_ids, attention_mask)
    model.train(was_training)
    return out


def label_embeddings(model: nn.Module, label_ids, pad_id: int, device) -> Tensor:
    """The label descriptions' embeddings (num_labels, d) under the model's current parameters."""
    ids, mask = pad_right([Encoded(list(t), None) for t in label_ids], pad_id)
    return _frozen_embed(model, ids.to(device), mask.to(device))


def fix_anchors(model: nn.Module, anchors: Tensor) -> None:
    """Hold ``anchors`` as the model's label embeddings for every later step (``prompt.anchors: fixed``)."""
    object.__setattr__(model, _ATTR, anchors.detach())


def fixed_anchors(model: nn.Module) -> Tensor | None:
    return getattr(model, _ATTR, None)


def anchor_cosine(anchors: Tensor) -> float:
    """Mean cosine between distinct label embeddings (1: collapsed onto one point)."""
    n = anchors.shape[0]
    gram = anchors.float() @ anchors.float().T
    return float((gram.sum() - gram.diagonal().sum()) / max(1, n * (n - 1)))


def logits(model: nn.Module, batch: dict, temperature: float = TEMPERATURE) -> Tensor:
    labels = fixed_anchors(model)
    if labels is None:  # prompt.anchors: live
        labels = _frozen_embed(model, batch["label_input_ids"], batch["label_attention_mask"])
    x = embed(model, batch["input_ids"], batch["attention_mask"])
    return x @ labels.to(x.dtype).T / temperature


def per_example_loss(model: nn.Module, batch: dict, temperature: float = TEMPERATURE) -> Tensor:
    return F.cross_entropy(logits(model, batch, temperature), batch["labels"], reduction="none")


class Similarity(Family):
    """The prompt objective on a sentence encoder: cosine to each label's description over a temperature;
    the descriptions' embeddings are taken once from the prepared encoder (``prompt.anchors: fixed``, the
    default) or re-embedded each step without gradient (``live``)."""

    @property
    def temperature(self) -> float:
        return float(self.obj.prompt.get("temperature", TEMPERATURE))

    @property
    def fixed(self) -> bool:
        return self.obj.prompt.get("anchors", "fixed") == "fixed"

    def _descriptions(self) -> tuple[str, ...]:
        return descriptions_for(self.obj.task, self.obj.prompt)

    def _label_ids(self, tokenizer) -> tuple:
        return tuple(tuple(tokenizer(d)["input_ids"]) for d in self._descriptions())

    def load(self, model_dir: Path) -> nn.Module:
        return load(model_dir)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list[SimilarityEncoded]:
        return encode(tokenizer, records, self.obj.task, max_length, self._descriptions(), self.obj.num_labels)

    def collate(self, examples: list[SimilarityEncoded], pad_id: int, device) -> dict:
        return collate(examples, pad_id, device)

    def loss(self, model, batch: dict) -> Tensor:
        return per_example_loss(model, batch, self.temperature)

    def logits(self, model, batch: dict) -> Tensor:
        return logits(model, batch, self.temperature)

    def prepare(self, model, tokenizer, device, model_dir: Path | None = None) -> None:
        """The fixed label embeddings: read from ``model_dir``'s ``label_anchors.pt`` when a trained run saved
        them there, else embedded now by ``model`` (before training: the prepared encoder; they read no
        training data, so they cost no privacy)."""
        if not self.fixed:
            return
        saved = Path(model_dir) / ANCHORS_FILE if model_dir is not None else None
        if saved is not None and saved.exists():
            anchors = torch.load(saved, map_location="cpu")
        else:
            anchors = label_embeddings(model, self._label_ids(tokenizer), tokenizer.pad_token_id, device)
        fix_anchors(model, anchors.to(device))

    def save(self, model, folder: Path) -> None:
        anchors = fixed_anchors(model)
        if anchors is not None:
            torch.save(anchors.cpu(), Path(folder) / ANCHORS_FILE)

    def step_record(self, model, tokenizer, device) -> dict:
        """The cosine between the label descriptions' current embeddings."""
        live = label_embeddings(model, self._label_ids(tokenizer), tokenizer.pad_token_id, device)
        return {"anchor_cosine": round(anchor_cosine(live), 6)}
