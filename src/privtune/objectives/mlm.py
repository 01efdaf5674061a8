"""The pre-training-aligned ("prompt") classification objective of Li et al. (2022).

Instead of a new classification head, each example is wrapped in a template
holding the mask token, and the label is predicted by the masked-LM head at the
mask position, restricted to one *label word* per class (LM-BFF, Gao et al.
2021). The per-example loss is the cross-entropy over the label words' MLM
logits at the mask; the prediction is the argmax over the label words.

Templates and label words (LM-BFF's manual prompts, ``run_experiment.sh``)
--------------------------------------------------------------------------

Template syntax (LM-BFF): parts between ``*``; ``cls``/``sep``/``mask`` are the
tokenizer's special tokens (``sep+`` also starts a new segment in LM-BFF; it is
the last part here, so all tokens are segment 0); ``sent_i`` is sentence ``i``
(0 = ``text_a``, 1 = ``text_b``), ``+sent`` prefixes a space, ``sentl``
lower-cases its first character, ``sent-`` drops its last character (the
premise's final punctuation); any other part is literal text with ``_`` for a
space.

| task | LM-BFF template | label words, in label-id order |
|------|-----------------|--------------------------------|
| sst2 | `*cls**sent_0*_It_was*mask*.*sep+*` | negative: terrible, positive: great |
| cola | `*cls**sent_0*_This_is*mask*.*sep+*` | unacceptable: incorrect, acceptable: correct |
| mnli | `*cls**sent-_0*?*mask*,*+sentl_1**sep+*` | entailment: Yes, neutral: Maybe, contradiction: No |
| qnli | `*cls**sent-_0*?*mask*,*+sentl_1**sep+*` | entailment: Yes, not_entailment: No |
| rte  | `*cls**sent-_0*?*mask*,*+sentl_1**sep+*` | entailment: Yes, not_entailment: No |
| mrpc | `*cls**sent_0**mask*,*+sentl_1**sep+*` | not_equivalent: No, equivalent: Yes |
| qqp  | `*cls**sent_0**mask*,*+sentl_1**sep+*` | not_duplicate: No, duplicate: Yes |

With RoBERTa, SST-2 reads ``<s>{sentence} It was<mask>.</s>``; MNLI (QNLI,
RTE alike) ``<s>{premise minus its last character}?<mask>, {hypothesis}</s>``;
MRPC/QQP ``<s>{sentence1}<mask>, {sentence2}</s>``; the second sentence has
its first character lower-cased. STS-B is a regression task and has no prompt
objective here: use ``objective: head``.

Label words are tokenized with a leading space, as LM-BFF does, so that a BPE
tokenizer picks the word-initial token (RoBERTa ``Ġgreat``); WordPiece drops
the space. Each must be a single token of the model's tokenizer, else a
:class:`ValueError` names the task, the word and the tokenizer. When a text is
too long, the sentences are truncated (longest first, at their end), never the
template or the mask token; text that spells a special token (``<mask>``) is
tokenized as plain text.

Efficiency: :func:`per_example_loss_prompt` runs the encoder, gathers the
hidden state at the mask (B, 1, d) and applies the MLM head module to it only,
so vocabulary logits are formed at one position per example. The head is called
as a module, so the ghost-clipping engine hooks its layers (the decoder is tied
to the word embeddings; its bias is registered twice, see ``dp/engine.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privtune.models.load import ModelPrepError, load_tokenizer
from privtune.objectives.family import Family
from privtune.objectives.templates import (TEMPLATES, PromptObjectiveError, PromptSpec,  # noqa: F401 (re-exported)
                                   mlm_spec, prompt_spec, supports_prompt)
from privtune.objectives.head import Encoded, pad_right

__all__ = [
    "TEMPLATES",
    "PromptEncoded",
    "PromptObjectiveError",
    "PromptSpec",
    "collate_prompt",
    "encode_prompt",
    "label_word_ids",
    "label_word_logits",
    "load_prompt_model",
    "mlm_head",
    "per_example_loss_prompt",
    "predict_prompt",
    "prompt_spec",
    "supports_prompt",
]


@dataclass
class PromptEncoded(Encoded):
    """An encoded example plus the mask position and the label words' token ids."""

    mask_pos: int
    label_word_ids: tuple[int, ...]




def _tokenizer_name(tokenizer) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or 'unnamed'})"


def label_word_ids(tokenizer, spec: PromptSpec, task: str) -> tuple[int, ...]:
    """Token id of each label word; a ValueError unless each is exactly one token."""
    ids = []
    for word in spec.label_words:
        toks = tokenizer(spec.label_prefix + word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise ValueError(
                f"task {task!r}: label word {word!r} (tokenized as {spec.label_prefix + word!r}) is "
                f"{len(toks)} tokens {pieces} for tokenizer {_tokenizer_name(tokenizer)}, but the prompt "
                "objective needs each label word to be a single token. Choose another label word or "
                "use objective: head."
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task!r}: label words {spec.label_words} map to repeated token ids {ids}")
    return tuple(ids)


# -- templates ---------------------------------------------------------------
_SENT = re.compile(r"^(\+?)sent([lu]?)(-?)_(\d+)$")


def _parts(template: str) -> list[str]:
    return [p for p in template.split("*") if p]


def _sentence_text(part: str, record: dict) -> str:
    """The text of sentence part ``part`` (``sent_0``, ``+sentl_1``, ``sent-_0``...) of ``record``."""
    plus, case, drop_last, idx = _SENT.match(part).groups()
    key = ("text_a", "text_b")[int(idx)]
    text = record.get(key)
    if text is None:
        raise ValueError(f"the template part {part!r} needs {key!r}, which this record lacks: {record}")
    if case == "l":
        text = text[:1].lower() + text[1:]
    elif case == "u":
        text = text[:1].upper() + text[1:]
    if drop_last:
        text = text[:-1]
    return " " + text if plus else text


def _fixed_ids(tokenizer, part: str) -> list[int]:
    """Token ids of a non-sentence template part."""
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "sep+": tokenizer.sep_token_id,
               "mask": tokenizer.mask_token_id}
    if part in special:
        if special[part] is None:
            raise PromptObjectiveError(f"tokenizer {_tokenizer_name(tokenizer)} has no {part} token")
        return [special[part]]
    return tokenizer(part.replace("_", " "), add_special_tokens=False)["input_ids"]


def _fit(lengths: list[int], budget: int) -> list[int]:
    """Shorten the longest sentence one token at a time until the lengths fit ``budget``."""
    lengths = list(lengths)
    while sum(lengths) > budget:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        lengths[i] -= 1
    return lengths


def _check_label(label, num_labels: int, task: str):
    if label is not None and not (isinstance(label, int) and 0 <= label < num_labels):
        raise ValueError(f"task {task!r}: label {label!r} is not a class id in [0, {num_labels})")


def encode_prompt(tokenizer, records: list[dict], task: str, max_length: int,
                  spec: PromptSpec | None = None) -> list[PromptEncoded]:
    """Fill ``task``'s template (or ``spec``) with each record; truncate sentences only.

    Records are ``{"text_a", "text_b" (optional), "label"}`` with integer labels
    (``None`` for unlabelled test rows). Returns one :class:`PromptEncoded` per
    record, whose ``labels`` is the class id and ``mask_pos`` the mask index.
    """
    spec = spec or prompt_spec(task)
    words = label_word_ids(tokenizer, spec, task)
    parts = _parts(spec.template)
    if parts.count("mask") != 1:
        raise ValueError(f"template {spec.template!r} must contain exactly one *mask* part")
    fixed = {p: _fixed_ids(tokenizer, p) for p in parts if not _SENT.match(p)}
    sent_parts = [p for p in parts if _SENT.match(p)]
    budget = max_length - sum(len(fixed[p]) for p in parts if p in fixed)
    if budget < len(sent_parts):
        raise ValueError(f"max_length={max_length} leaves no room for the sentences of template {spec.template!r}")
    sentences = {p: tokenizer([_sentence_text(p, r) for r in records], add_special_tokens=False,
                              split_special_tokens=True)["input_ids"] if records else [] for p in sent_parts}
    out = []
    for i, r in enumerate(records):
        _check_label(r.get("label"), len(words), task)
        keep = dict(zip(sent_parts, _fit([len(sentences[p][i]) for p in sent_parts], budget)))
        ids: list[int] = []
        for p in parts:
            if p == "mask":
                mask_pos = len(ids)
            ids += fixed[p] if p in fixed else sentences[p][i][: keep[p]]
        out.append(PromptEncoded(ids, r.get("label"), mask_pos, words))
    return out


def collate_prompt(examples: list[PromptEncoded], pad_id: int, device) -> dict:
    """Right-padded batch: input_ids, attention_mask (B, T); labels, mask_pos (B,); label_word_ids (K,).

    Unlabelled examples get label -1 (fine for prediction, not for the loss).
    """
    words = examples[0].label_word_ids
    if any(e.label_word_ids != words for e in examples):
        raise ValueError("examples of one batch were encoded with different label words")
    ids, mask = pad_right(examples, pad_id)
    labels = torch.tensor([-1 if e.labels is None else int(e.labels) for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "mask_pos": torch.tensor([e.mask_pos for e in examples]).to(device),
            "label_word_ids": torch.tensor(words).to(device)}


# -- model -------------------------------------------------------------------
def mlm_head(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the masked-LM head: the child of ``model`` holding the output embeddings.

    BERT: ``cls``; RoBERTa: ``lm_head``. It must map hidden states (…, d) to
    vocabulary logits on its own, so every other non-encoder child must be
    parameter-free.
    """
    decoder, base = model.get_output_embeddings(), model.base_model
    children = [(n, m) for n, m in model.named_children() if m is not base]
    heads = [(n, m) for n, m in children if any(x is decoder for x in m.modules())]
    others = [n for n, m in children if n not in dict(heads) and next(m.parameters(), None) is not None]
    if decoder is None or len(heads) != 1 or others:
        raise PromptObjectiveError(
            f"cannot find a single masked-LM head module in {type(model).__name__} (head candidates "
            f"{[n for n, _ in heads]}, other trained modules {others}); the prompt objective supports "
            "BERT/RoBERTa-style MLM heads. Use objective: head for this model."
        )
    return heads[0]


def _no_head_error(model_dir: Path, model_type: str, detail: str) -> PromptObjectiveError:
    return PromptObjectiveError(
        f"model {model_dir} ({model_type}) has no pretrained masked-LM head ({detail}); the prompt objective "
        "scores label words with the model's masked-LM head, so it needs one. Use objective: head (the "
        "standard classification head) for this model."
    )


def _missing_head_keys(model: nn.Module, prefix: str, missing: set[str]) -> list[str]:
    """Checkpoint keys of the head that were not loaded under any of their tied names."""
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, set[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), set()).add(name)
    return sorted(k for k in missing if k.startswith(prefix + ".")
                  and (k not in params or aliases[id(params[k])] <= missing))


@torch.no_grad()
def _check_head_path(model: nn.Module, tokenizer) -> None:
    """The mask-only path (encoder, then head on one position) must equal the model's own logits."""
    ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.mask_token_id, tokenizer.sep_token_id]])
    ids = ids.to(next(model.parameters()).device)
    want = model(input_ids=ids).logits[:, 1].float()
    got = mlm_head(model)[1](model.base_model(input_ids=ids).last_hidden_state[:, 1:2])[:, 0].float()
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
        raise PromptObjectiveError(
            f"{type(model).__name__}: applying the MLM head module to the encoder's hidden states does not "
            "reproduce the model's logits; the prompt objective does not support this model. Use objective: head."
        )


def load_prompt_model(model_dir: Path, dtype=torch.float32, allow_new_head: bool = False):
    """A masked LM with its pretrained MLM head from a prepared model folder.

    Raises :class:`PromptObjectiveError` when the model type has no masked-LM
    class (GPT-2, Llama) or the checkpoint has no MLM head (a sentence-transformers
    export such as all-MiniLM-L6-v2, or a folder written with ``AutoModel``).
    ``allow_new_head=True`` accepts a random-init head (random tiny test models
    only: with a pretrained encoder it would defeat the objective).
    """
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelPrepError(f"{model_dir} is not a prepared model folder; run the prepare_model rule first")
    config = AutoConfig.from_pretrained(model_dir)
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise PromptObjectiveError(
            f"model {model_dir} is of type {config.model_type!r}, which has no masked-LM head class; the prompt "
            "objective needs a masked LM (BERT, RoBERTa). Use objective: head for this model."
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing-head report is turned into our own error below
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix, _ = mlm_head(model)
    missing = _missing_head_keys(model, prefix, set(info["missing_keys"]))
    if missing and not allow_new_head:
        raise _no_head_error(model_dir, config.model_type, f"missing from the checkpoint: {', '.join(missing)}")
    tokenizer = load_tokenizer(model_dir)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _check_head_path(model, tokenizer)
    return model


# -- loss and prediction ---------------------------------------------------
def label_word_logits(model: nn.Module, batch: dict) -> Tensor:
    """MLM logits of the label words at the mask position, (B, K), in the model's dtype."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    at_mask = hidden[rows, batch["mask_pos"]].unsqueeze(1)  # (B, 1, d)
    logits = mlm_head(model)[1](at_mask)[:, 0]  # (B, V), one position per example
    return logits.index_select(-1, batch["label_word_ids"])


def per_example_loss_prompt(model: nn.Module, batch: dict) -> Tensor:
    """Cross-entropy over the label words at the mask, per example (B,), in float32 (float64 models: float64)."""
    logits = label_word_logits(model, batch)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, batch["labels"], reduction="none")


@torch.no_grad()
def predict_prompt(model: nn.Module, encoded: list[PromptEncoded], pad_id: int, device,
                   batch_size: int = 64) -> list[int]:
    """Class ids: the argmax over the label words' MLM logits at the mask (model left in eval mode)."""
    model.eval()
    preds: list[int] = []
    for i in range(0, len(encoded), batch_size):
        batch = collate_prompt(encoded[i: i + batch_size], pad_id, device)
        preds.extend(label_word_logits(model, batch).argmax(-1).tolist())
    return preds



class MaskedLM(Family):
    """The prompt objective on a masked LM: label words scored at the template's mask token."""

    def spec(self) -> PromptSpec:
        return mlm_spec(self.obj.task, self.obj.prompt)

    def load(self, model_dir: Path):
        return load_prompt_model(model_dir)

    def encode(self, tokenizer, records: list[dict], max_length: int) -> list[PromptEncoded]:
        return encode_prompt(tokenizer, records, self.obj.task, max_length, spec=self.spec())

    def collate(self, examples: list[PromptEncoded], pad_id: int, device) -> dict:
        return collate_prompt(examples, pad_id, device)

    def loss(self, model, batch: dict) -> Tensor:
        return per_example_loss_prompt(model, batch)

    def logits(self, model, batch: dict) -> Tensor:
        return label_word_logits(model, batch)
