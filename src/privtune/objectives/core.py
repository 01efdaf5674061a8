"""The objectives behind one interface (:func:`objective`); see :mod:`privtune.objectives`.

:class:`Objective` is what training and evaluation hold; it asks the family registered for it
(:mod:`privtune.objectives.family`) for everything it does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from privtune.objectives import family as families


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
    family: str | None = None  # the prompt objective's form (family.FAMILIES); None until a model is known

    def __post_init__(self) -> None:
        # refuse a task without a template now, not mid-run
        families.check(self.kind, self.task, self.name, self.num_labels, self.prompt, self.family)

    @cached_property  # resolved once per objective, not on every batch (frozen: cached in __dict__)
    def impl(self) -> families.Family:
        """The registered family that does the work."""
        key = families.key(self.name, self.family)
        if key is None:
            raise ValueError("the prompt objective's family is not known: build it with objective(..., model_dir=)")
        return families.family_class(key)(self)

    def load(self, model_dir: Path):
        return self.impl.load(model_dir)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list:
        return self.impl.encode(tokenizer, records, max_length)

    def collate(self, examples: list, pad_id: int, device) -> dict:
        return self.impl.collate(examples, pad_id, device)

    def loss(self, model, batch: dict):
        """Per-example losses, shape (B,)."""
        return self.impl.loss(model, batch)

    def predict(self, model, encoded: list, pad_id: int, device, batch_size: int = 64) -> list:
        """Predictions in the order of ``encoded``."""
        return self.impl.predict(model, encoded, pad_id, device, batch_size)

    def prepare(self, model, tokenizer, device, model_dir: Path | None = None) -> None:
        """Before the first step or prediction (the similarity objective's fixed label embeddings)."""
        self.impl.prepare(model, tokenizer, device, model_dir)

    def save(self, model, folder: Path) -> None:
        """What the objective keeps beside the weights."""
        self.impl.save(model, folder)

    def step_record(self, model, tokenizer, device) -> dict:
        """Per-step quantities that are functions of the parameters alone (free to log under DP)."""
        return self.impl.step_record(model, tokenizer, device)


def objective(kind: str, task: str | None = None, name: str = "head", num_labels: int = 2,
              prompt: dict | None = None, model_dir: Path | None = None) -> Objective:
    """The objective ``name`` for a task; with ``model_dir``, the prompt objective takes the form that
    model's family needs (``prompt.family`` overrides)."""
    prompt = dict(prompt or {})
    family = None
    if (name or "head") == "prompt":
        family = prompt.get("family") or (prompt_family(model_dir) if model_dir is not None else None)
    return Objective(kind, task, name or "head", num_labels, prompt, family)
