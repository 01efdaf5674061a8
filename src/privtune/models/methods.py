"""Fine-tuning methods of Li et al. (2022), Table 4: which parameters train.

=========  ===================================================================================
method     what trains
=========  ===================================================================================
full       every parameter
lora       rank-``r`` adapters (``peft`` LoRA, scaling ``alpha / r``) on ``target_modules``
           (peft's default per architecture: GPT-2 ``c_attn``, Llama ``q_proj, v_proj``, BERT
           ``query, value``); a classification head trains fully
prefix     prefix-tuning (``peft``): ``num_virtual_tokens`` key/value pairs per layer, produced
           by an embedding and, with ``projection: true`` (Li & Liang's reparametrisation), a
           two-layer MLP of width ``hidden``; a classification head trains fully
top2       the last ``layers`` (2) transformer blocks, the final norm and the head. With a head
           tied to the word embedding (GPT-2, SmolLM2) the head *is* the embedding matrix, so
           ``head: true`` trains it too; ``head: false`` freezes it
retrain    every parameter of the same architecture from a random initialisation (seeded)
=========  ===================================================================================

Options come from an experiment's ``method_options: {lora: {...}, prefix: {...}, top2: {...}}``.

Every trainable parameter these methods create lives in a layer the ghost-clipping
engine clips exactly: LoRA's A and B are ``nn.Linear`` (the ``alpha / r`` scaling is
applied to B's output, so B's output gradient already carries it); prefix-tuning's
parameters are an ``nn.Embedding`` looked up with one row of prefix ids *per example*
(peft expands them to the batch), then ``nn.Linear`` layers, so each example's
prefix has its own output rows and its gradient is exact. ``tests/test_methods.py``
checks all of them against brute-force per-example gradients. Frozen parameters get
no hooks, no norms and no per-example state.

A method that leaves no parameter to train (a model loaded with every parameter frozen, a
model with nothing above its blocks under ``top2`` with ``layers: 0``) is a :class:`MethodError`,
as are LoRA target modules that match nothing.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from privtune.choices import METHODS, MethodError, check_objective  # noqa: F401 (re-exported)

DEFAULTS = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None},
    "prefix": {"num_virtual_tokens": 10, "projection": True, "hidden": 512},
    "top2": {"layers": 2, "head": True},
}
ADAPTER_DIR = "prefix_adapter"  # inside a trained model folder: peft's prefix adapter


def options(method: str, given: dict | None = None) -> dict:
    """``method``'s options: its defaults updated with ``given``; unknown keys are an error."""
    if method not in METHODS:
        raise MethodError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    base = dict(DEFAULTS.get(method, {}))
    unknown = sorted(set(given or {}) - set(base))
    if unknown:
        raise MethodError(f"method_options.{method} has unknown key(s) {unknown}; known: {sorted(base)}")
    base.update(given or {})
    return base


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules (a tied head) counts once,
    as ``parameters()`` yields it once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _peft_task_type(kind: str):
    from peft import TaskType

    return TaskType.CAUSAL_LM if kind == "table2text" else TaskType.SEQ_CLS


def _lora(model: nn.Module, kind: str, o: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type=_peft_task_type(kind), r=int(o["r"]), lora_alpha=float(o["alpha"]),
                     lora_dropout=float(o["dropout"]), target_modules=o["target_modules"], bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. target modules that match nothing, or no default for this architecture
        raise MethodError(f"LoRA cannot be applied to {type(model).__name__}: {e}. Set "
                          "method_options.lora.target_modules to the names of its Linear layers") from e


def _prefix(model: nn.Module, kind: str, o: dict) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    cfg = PrefixTuningConfig(task_type=_peft_task_type(kind), num_virtual_tokens=int(o["num_virtual_tokens"]),
                             prefix_projection=bool(o["projection"]), encoder_hidden_size=int(o["hidden"]))
    return get_peft_model(model, cfg)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: its longest ``ModuleList`` of modules of one type."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1
                and any(True for _ in mod.parameters()) and (best is None or len(mod) > len(best[1]))):
            best = (name, mod)
    if best is None:
        raise MethodError(f"top2: found no stack of transformer blocks in {type(model).__name__}")
    return best


def _is_embedding_side(name: str, module: nn.Module) -> bool:
    """Modules below the blocks: token/position embeddings and whatever sits in an ``embeddings`` module
    (BERT's embedding LayerNorm)."""
    return isinstance(module, nn.Embedding) or any(part.startswith("embed") for part in name.split("."))


def _top(model: nn.Module, o: dict) -> nn.Module:
    k = int(o["layers"])
    blocks_name, blocks = transformer_blocks(model)
    if not 0 <= k <= len(blocks):
        raise MethodError(f"method_options.top2.layers = {k}, but the model has {len(blocks)} blocks")
    model.requires_grad_(False)
    for block in list(blocks)[len(blocks) - k:]:  # k = 0: none
        block.requires_grad_(True)
    # above the blocks: final norm, pooler, classifier, an untied LM head
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + ".") or not name:
            continue
        if _is_embedding_side(name, module):
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.weight.requires_grad_(bool(o["head"]))  # tied: this is the word embedding
    return model


def _retrain(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    return fresh.to(dtype=next(model.parameters()).dtype)


def untie_lm_head(model: nn.Module) -> bool:
    """Give a causal LM whose output layer shares the input embedding's weight a copy of its own, as Li et
    al.'s table-to-text code does (lxuechen/private-transformers@14b4147 examples/table2text/
    run_language_modeling.py: ``tie_word_embeddings = False``, the embedding copied into ``lm_head``): the
    head is then clipped and noised as a parameter of its own. A head that is already separate is left as
    it is (copying the embedding over it would discard it). Returns whether the head was tied."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None or out.weight is not emb.weight:
        return False
    out.weight = nn.Parameter(emb.weight.detach().clone())
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if getattr(model, "all_tied_weights_keys", None):  # transformers' own record of what to tie again
        model.all_tied_weights_keys = {}
    return True


def head_is_tied(model: nn.Module) -> bool:
    """Whether a model's output layer shares its weight with the input embedding (peft wrappers looked into)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out, emb = base.get_output_embeddings(), base.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def apply(model: nn.Module, method: str, kind: str, given: dict | None = None, seed: int = 0,
          objective: str = "head") -> nn.Module:
    """``model`` prepared for ``method`` (a peft wrapper for LoRA and prefix-tuning)."""
    o = options(method, given)
    check_objective(method, objective)
    if method == "lora":
        model = _lora(model, kind, o)
    elif method == "prefix":
        model = _prefix(model, kind, o)
    elif method == "top2":
        model = _top(model, o)
    elif method == "retrain":
        model = _retrain(model, seed)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise MethodError(f"method {method!r} with options {o} leaves no trainable parameter in "
                          f"{type(model).__name__} ({total} parameters): change method_options.{method}")
    return model


def save_trained(model: nn.Module, method: str, out: Path) -> None:
    """Write a trained model that ``from_pretrained`` reads (then :func:`attach_adapter` for a prefix).

    LoRA adapters are merged into the weights (the result is an ordinary model of the base
    architecture); a prefix cannot be merged, so its peft adapter goes into ``ADAPTER_DIR``
    beside the (unchanged) base weights.
    """
    out = Path(out)
    if method == "lora":
        model.merge_and_unload().save_pretrained(out)
    elif method == "prefix":
        model.get_base_model().save_pretrained(out)
        model.save_pretrained(out / ADAPTER_DIR)
    else:
        model.save_pretrained(out)


def attach_adapter(model: nn.Module, model_dir: Path) -> nn.Module:
    """``model`` with the prefix adapter of ``model_dir`` attached, if the folder has one."""
    adapter = Path(model_dir) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").exists():
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter)
