"""The objectives behind one interface (:func:`objective`); see :mod:`privtune.objectives`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from privtune.objectives import mlm as prompting

from privtune.objectives import head as tasks
from privtune.models.load import load_for_task
from privtune.objectives import causal, similarity, templates
from privtune.objectives.templates import FAMILIES, OBJECTIVES  # noqa: F401


def prompt_family(model_dir: Path) -> str:
    """Which form of the prompt objective a prepared model takes, from its ``config.json``:
    ``mlm`` for a masked LM, ``causal`` for a causal LM, ``similarity`` for a bare encoder."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        from privtune.models.load import ModelPrepError

        raise ModelPrepError(f"{model_dir} is not a prepared model folder (no config.json); run prepare_model")
    archs = json.loads(path.read_text()).get("architectures") or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "mlm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "similarity"


@dataclass(frozen=True)
class Objective:
    kind: str  # classification | regression | table2text
    task: str | None = None
    name: str = "head"
    num_labels: int = 2
    prompt: dict = field(default_factory=dict)  # overrides of the task's template / label words
    family: str | None = None  # the prompt objective's form (FAMILIES); None until a model is known

    def __post_init__(self) -> None:
        # refuse a task without a template now, not mid-run
        templates.check(self.kind, self.task, self.name, self.num_labels, self.prompt, self.family)

    @property
    def temperature(self) -> float:
        return float(self.prompt.get("temperature", similarity.TEMPERATURE))

    @property
    def fixed_anchors(self) -> bool:
        """The similarity objective with label embeddings taken once (``prompt.anchors: fixed``)."""
        return (self.name == "prompt" and self.family == "similarity"
                and self.prompt.get("anchors", "fixed") == "fixed")

    def _label_ids(self, tokenizer) -> tuple:
        descriptions = similarity.descriptions_for(self.task, self.prompt)
        return tuple(tuple(tokenizer(d)["input_ids"]) for d in descriptions)

    def prepare(self, model, tokenizer, device, model_dir: Path | None = None) -> None:
        """Before the first step or prediction: the similarity objective's fixed label embeddings, read from
        ``model_dir``'s ``label_anchors.pt`` when a trained run saved them there, else embedded now by
        ``model`` (before training: the prepared encoder). A no-op for every other objective."""
        if not self.fixed_anchors:
            return
        saved = Path(model_dir) / similarity.ANCHORS_FILE if model_dir is not None else None
        if saved is not None and saved.exists():
            anchors = torch.load(saved, map_location="cpu")
        else:
            anchors = similarity.label_embeddings(model, self._label_ids(tokenizer), tokenizer.pad_token_id, device)
        similarity.fix_anchors(model, anchors.to(device))

    def save(self, model, folder: Path) -> None:
        """What the objective keeps beside the weights (the fixed label embeddings)."""
        anchors = similarity.fixed_anchors(model)
        if anchors is not None:
            torch.save(anchors.cpu(), Path(folder) / similarity.ANCHORS_FILE)

    def step_record(self, model, tokenizer, device) -> dict:
        """Per-step quantities that are functions of the parameters alone (no data: free to log under DP):
        the cosine between the label descriptions' current embeddings, for the similarity objective."""
        if not (self.name == "prompt" and self.family == "similarity"):
            return {}
        live = similarity.label_embeddings(model, self._label_ids(tokenizer), tokenizer.pad_token_id, device)
        return {"anchor_cosine": round(similarity.anchor_cosine(live), 6)}

    def spec(self) -> prompting.PromptSpec:
        return templates.mlm_spec(self.task, self.prompt)

    def _family(self) -> str:
        if self.family is None:
            raise ValueError("the prompt objective's family is not known: build it with objective(..., model_dir=)")
        return self.family

    def load(self, model_dir: Path):
        if self.name == "prompt":
            return {"mlm": prompting.load_prompt_model, "causal": causal.load,
                    "similarity": similarity.load}[self._family()](model_dir)
        return load_for_task(model_dir, self.kind, self.num_labels)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list:
        if self.name == "prompt":
            family = self._family()
            if family == "causal":
                return causal.encode(tokenizer, records, self.task, max_length, causal.spec_for(self.task, self.prompt))
            if family == "similarity":
                return similarity.encode(tokenizer, records, self.task, max_length,
                                         similarity.descriptions_for(self.task, self.prompt), self.num_labels)
            return prompting.encode_prompt(tokenizer, records, self.task, max_length, spec=self.spec())
        return tasks.encode(tokenizer, records, self.kind, max_length)

    def collate(self, examples: list, pad_id: int, device) -> dict:
        if self.name == "prompt":
            return {"mlm": prompting.collate_prompt, "causal": causal.collate,
                    "similarity": similarity.collate}[self._family()](examples, pad_id, device)
        return tasks.collate(examples, pad_id, self.kind, device)

    def _logits(self, model, batch: dict):
        family = self._family()
        if family == "causal":
            return causal.label_word_logits(model, batch)
        if family == "similarity":
            return similarity.logits(model, batch, self.temperature)
        return prompting.label_word_logits(model, batch)

    def loss(self, model, batch: dict):
        """Per-example losses, shape (B,)."""
        if self.name == "prompt":
            family = self._family()
            if family == "causal":
                return causal.per_example_loss(model, batch)
            if family == "similarity":
                return similarity.per_example_loss(model, batch, self.temperature)
            return prompting.per_example_loss_prompt(model, batch)
        return tasks.per_example_loss(model, batch, self.kind)

    @torch.no_grad()
    def predict(self, model, encoded: list, pad_id: int, device, batch_size: int = 64) -> list:
        """Predictions in the order of ``encoded``; batches are formed by length (less padding)."""
        if self.name != "prompt":
            return tasks.predict_labels(model, encoded, pad_id, self.kind, device, batch_size)
        model.eval()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        preds: list = [None] * len(encoded)
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            batch = self.collate([encoded[i] for i in idx], pad_id, device)
            for i, p in zip(idx, self._logits(model, batch).argmax(-1).tolist()):
                preds[i] = p
        return preds


def objective(kind: str, task: str | None = None, name: str = "head", num_labels: int = 2,
              prompt: dict | None = None, model_dir: Path | None = None) -> Objective:
    """The objective ``name`` for a task; with ``model_dir``, the prompt objective takes the form that
    model's family needs (``prompt.family`` overrides)."""
    prompt = dict(prompt or {})
    family = None
    if (name or "head") == "prompt":
        family = prompt.get("family") or (prompt_family(model_dir) if model_dir is not None else None)
    return Objective(kind, task, name or "head", num_labels, prompt, family)
