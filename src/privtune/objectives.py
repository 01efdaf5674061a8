"""Training objectives, selectable per experiment (``objective:``), behind one interface.

========  ==================================================================================
head      the standard heads: a new classification head (cross-entropy), a regression head
          (MSE, STS-B), or the causal LM's own head on ``table <sep> text`` (E2E, DART)
prompt    Li et al.'s pre-training-aligned formulation for classification: an LM-BFF template
          with a mask token, scored by the masked-LM head on one label word per class
          (:mod:`privtune.prompting` lists the templates and label words). Needs a model with
          a pretrained masked-LM head (RoBERTa, BERT); anything else is refused, naming the model
========  ==================================================================================

Training and evaluation call only :func:`objective` and the returned object's methods, so
both use the same encoding, batching, loss and prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import prompting, tasks
from .models import load_for_task

OBJECTIVES = ("head", "prompt")


@dataclass(frozen=True)
class Objective:
    kind: str  # classification | regression | table2text
    task: str | None = None
    name: str = "head"
    num_labels: int = 2
    prompt: dict = field(default_factory=dict)  # overrides of the task's template / label words

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.name!r}")
        if self.name == "prompt":
            if self.kind != "classification":
                raise prompting.PromptObjectiveError(
                    f"objective: prompt scores label words, so it needs a classification task; task "
                    f"{self.task!r} is {self.kind}. Use objective: head.")
            self.spec()  # refuses tasks without a template now, not mid-run

    def spec(self) -> prompting.PromptSpec:
        base = prompting.prompt_spec(self.task)
        words = self.prompt.get("label_words")
        if words is not None and len(words) != self.num_labels:
            raise ValueError(f"prompt.label_words {words} has {len(words)} words; task {self.task} has "
                             f"{self.num_labels} labels")
        return prompting.PromptSpec(self.prompt.get("template", base.template),
                                    tuple(words) if words is not None else base.label_words,
                                    self.prompt.get("label_prefix", base.label_prefix))

    def load(self, model_dir: Path):
        if self.name == "prompt":
            return prompting.load_prompt_model(model_dir)
        return load_for_task(model_dir, self.kind, self.num_labels)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list:
        if self.name == "prompt":
            return prompting.encode_prompt(tokenizer, records, self.task, max_length, spec=self.spec())
        return tasks.encode(tokenizer, records, self.kind, max_length)

    def collate(self, examples: list, pad_id: int, device) -> dict:
        if self.name == "prompt":
            return prompting.collate_prompt(examples, pad_id, device)
        return tasks.collate(examples, pad_id, self.kind, device)

    def loss(self, model, batch: dict):
        """Per-example losses, shape (B,)."""
        if self.name == "prompt":
            return prompting.per_example_loss_prompt(model, batch)
        return tasks.per_example_loss(model, batch, self.kind)

    def predict(self, model, encoded: list, pad_id: int, device) -> list:
        if self.name == "prompt":
            return prompting.predict_prompt(model, encoded, pad_id, device)
        return tasks.predict_labels(model, encoded, pad_id, self.kind, device)


def objective(kind: str, task: str | None = None, name: str = "head", num_labels: int = 2,
              prompt: dict | None = None) -> Objective:
    return Objective(kind, task, name or "head", num_labels, dict(prompt or {}))
