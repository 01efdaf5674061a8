"""Loading a prepared model folder (:mod:`privtune.models.prepare` writes it) for a task."""
from __future__ import annotations

from pathlib import Path

import torch


class ModelPrepError(RuntimeError):
    """A model folder is missing, incomplete or cannot serve the requested objective."""


def default_device() -> torch.device:
    """CUDA when present, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_for_task(model_dir: Path, kind: str, num_labels: int = 2, dtype=torch.float32):
    """A model for ``kind`` (classification, regression, table2text) from a prepared folder.

    Heads absent from the folder (a classifier on a sentence encoder) are
    initialised from the current torch seed.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelPrepError(f"{model_dir} is not a prepared model folder; run the prepare_model rule first")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised head" notices are expected here
    try:
        if kind == "table2text":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        else:
            labels = 1 if kind == "regression" else num_labels
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=labels, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        tok = load_tokenizer(model_dir)
        model.config.pad_token_id = tok.pad_token_id
    return model
