"""Loading a prepared model folder (:mod:`privtune.models.prepare` writes it) for a task."""
from __future__ import annotations

from pathlib import Path

import torch


class ModelPrepError(RuntimeError):
    """A model folder is missing, incomplete or cannot serve the requested objective."""


def default_device() -> torch.device:
    """CUDA when present, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware: a CUDA device that supports bf16, or a
    CPU with AVX512-BF16 or AMX-BF16 (read from ``cpuinfo``; elsewhere, e.g. macOS, no)."""
    if device.type == "cuda":  # bf16 in hardware (compute capability 8.0 on), not emulated (a V100, a T4)
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision``: fp32 and bf16 as given; ``auto`` is bf16 where ``device`` computes it natively
    (:func:`native_bf16`), fp32 elsewhere (bf16 emulated in software is slower than fp32)."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or auto")


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
