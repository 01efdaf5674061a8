"""The prompt (masked-LM label word) objective: encoding, loss, prediction, loading, and DP ghost clipping."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from privtune.models.architectures import tiny_config
from privtune.data.readers import task_info
from privtune.dp.engine import GhostClipEngine
from privtune.dp.layers import UnsupportedLayerError
from privtune.models.prepare import byte_tokenizer
from privtune.objectives.mlm import (
    TEMPLATES,
    PromptObjectiveError,
    PromptSpec,
    collate_prompt,
    encode_prompt,
    load_prompt_model,
    per_example_loss_prompt,
    predict_prompt,
    supports_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
# The offline byte tokenizer has no merges: only single characters (no leading space) are one token.
SINGLE = PromptSpec("*cls**sent_0*_It_was*mask*.*sep+*", ("+", "-"), label_prefix="")
PAIR = PromptSpec("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", ("y", "m", "n"), label_prefix="")
RECORDS = [
    {"text_a": "a fine film", "text_b": "It is good.", "label": 1},
    {"text_a": "dull and far too long for what it is", "text_b": "It is bad.", "label": 0},
    {"text_a": "ok", "text_b": "Maybe.", "label": 1},
]
PAIR_RECORDS = [dict(r, label=i % 3) for i, r in enumerate(RECORDS)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer("bert")


def tiny_mlm(arch, tok, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_attention_heads=2)
    return AutoModelForMaskedLM.from_config(cfg, dtype=dtype).eval()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# -- registry ------------------------------------------------------------------
def test_templates_cover_the_classification_tasks():
    for task in ("sst2", "SST-2", "qnli", "mnli", "qqp", "cola", "rte", "mrpc"):
        assert supports_prompt(task)
    assert not supports_prompt("stsb") and not supports_prompt("e2e")
    for task, spec in TEMPLATES.items():
        assert len(spec.label_words) == task_info(task)["num_labels"], task
        assert spec.template.count("*mask*") == 1
    assert TEMPLATES["sst2"].label_words == ("terrible", "great")
    assert TEMPLATES["mnli"].label_words == ("Yes", "Maybe", "No")  # entailment, neutral, contradiction


def test_stsb_is_refused(tok):
    with pytest.raises(PromptObjectiveError, match=r"stsb.*regression.*objective: head"):
        encode_prompt(tok, [{"text_a": "a", "text_b": "b", "label": 3.2}], "stsb", 64)


def test_multi_token_label_word_is_an_error_naming_task_word_and_tokenizer(tok):
    with pytest.raises(ValueError, match=r"'sst2'.*'terrible'.*9 tokens.*for tokenizer .*single token"):
        encode_prompt(tok, RECORDS, "sst2", 64)


def test_label_out_of_range_is_an_error(tok):
    with pytest.raises(ValueError, match=r"label 2 is not a class id"):
        encode_prompt(tok, [{"text_a": "x", "label": 2}], "sst2", 64, spec=SINGLE)


# -- encoding --------------------------------------------------------------------
def test_template_layout_and_label_word_ids(tok):
    enc = encode_prompt(tok, RECORDS, "sst2", 64, spec=SINGLE)
    first = enc[0]
    want = [tok.cls_token_id] + ids_of(tok, "a fine film") + ids_of(tok, " It was") + [tok.mask_token_id] \
        + ids_of(tok, ".") + [tok.sep_token_id]
    assert first.input_ids == want
    assert first.input_ids[first.mask_pos] == tok.mask_token_id
    plus, minus = ids_of(tok, "+") + ids_of(tok, "-")
    batch = collate_prompt(enc, tok.pad_token_id, "cpu")
    assert batch["label_word_ids"].tolist() == [plus, minus]
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["mask_pos"].tolist() == [e.mask_pos for e in enc]
    assert (batch["input_ids"][torch.arange(3), batch["mask_pos"]] == tok.mask_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in enc]


def test_text_spelling_special_tokens_stays_plain_text(tok):
    e = encode_prompt(tok, [{"text_a": "a <mask> and <s> b", "label": 0}], "sst2", 64, spec=SINGLE)[0]
    assert e.input_ids.count(tok.mask_token_id) == 1 and e.input_ids.count(tok.cls_token_id) == 1
    assert e.input_ids[1: 1 + len(ids_of(tok, "a <"))] == [ids_of(tok, c)[0] for c in "a <"]


def test_pair_template_lowercases_and_drops_last_char(tok):
    e = encode_prompt(tok, [{"text_a": "Is it?", "text_b": "Yes it is", "label": 0}], "mnli", 64, spec=PAIR)[0]
    assert tok.decode(e.input_ids) == "<s>Is it?<mask>, yes it is</s>"


@pytest.mark.parametrize("spec,task", [(SINGLE, "sst2"), (PAIR, "mnli")])
def test_mask_survives_truncation_of_long_sentences(tok, spec, task):
    long = "a very long review " * 40
    records = [{"text_a": long, "text_b": "short one.", "label": 0},
               {"text_a": "tiny", "text_b": long, "label": 1}]
    for e in encode_prompt(tok, records, task, 48, spec=spec):
        assert len(e.input_ids) <= 48
        assert e.input_ids.count(tok.mask_token_id) == 1 and e.input_ids[e.mask_pos] == tok.mask_token_id
        assert e.input_ids.count(tok.cls_token_id) == 1 and e.input_ids[0] == tok.cls_token_id
        assert e.input_ids[-1] == tok.sep_token_id
    single = encode_prompt(tok, records[:1], task, 48, spec=spec)[0]
    assert len(single.input_ids) == 48
    if spec is SINGLE:  # the template after the sentence is intact
        tail = ids_of(tok, " It was") + [tok.mask_token_id] + ids_of(tok, ".") + [tok.sep_token_id]
        assert single.input_ids[-len(tail):] == tail
    else:  # longest first: the short hypothesis is kept whole
        assert tok.decode(single.input_ids).endswith("<mask>, short one.</s>")


def test_max_length_too_short_for_the_template(tok):
    with pytest.raises(ValueError, match="max_length=8 leaves no room"):
        encode_prompt(tok, RECORDS, "sst2", 8, spec=SINGLE)


# -- loss and prediction ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_loss_and_predictions_match_the_full_mlm_logits(tok, arch):
    model = tiny_mlm(arch, tok)
    enc = encode_prompt(tok, PAIR_RECORDS, "mnli", 64, spec=PAIR)
    batch = collate_prompt(enc, tok.pad_token_id, "cpu")
    losses = per_example_loss_prompt(model, batch)
    assert losses.shape == (3,) and losses.dtype == torch.float32
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = logits[torch.arange(3), batch["mask_pos"]][:, batch["label_word_ids"]]
    torch.testing.assert_close(losses, F.cross_entropy(ref.float(), batch["labels"], reduction="none"))
    preds = predict_prompt(model, enc, tok.pad_token_id, "cpu", batch_size=2)
    assert preds == ref.argmax(-1).tolist()


# -- loading ------------------------------------------------------------------------
def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_load_prompt_model_keeps_the_pretrained_head(tok, tmp_path, arch):
    saved = tiny_mlm(arch, tok, seed=3)
    model = load_prompt_model(_save(saved, tok, tmp_path))
    for (name, want), got in zip(saved.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)


def test_checkpoint_without_mlm_head_is_refused(tok, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config("bert", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    path = _save(AutoModel.from_config(cfg), tok, tmp_path)
    with pytest.raises(PromptObjectiveError, match=r"no pretrained masked-LM head.*cls\.predictions.*objective: head"):
        load_prompt_model(path)
    assert isinstance(load_prompt_model(path, allow_new_head=True), nn.Module)  # random tiny models only


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_type_without_masked_lm_is_refused(tmp_path, arch):
    AutoModelForCausalLM.from_config(tiny_config(arch)).config.save_pretrained(tmp_path)
    with pytest.raises(PromptObjectiveError, match=rf"'{arch}'.*no masked-LM head class.*objective: head"):
        load_prompt_model(tmp_path)


def test_sentence_transformers_minilm_has_no_mlm_head():
    path = ROOT / "results" / "models" / "minilm"
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not prepared")
    with pytest.raises(PromptObjectiveError, match=r"minilm \(bert\) has no pretrained masked-LM head"):
        load_prompt_model(path)


# -- differential privacy: ghost clipping on a masked LM ---------------------------------
def brute_force_norms(params, loss_fn):
    losses = loss_fn()
    norms = []
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    return torch.stack(norms)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_ghost_clipping_is_exact_under_the_prompt_loss(tok, float64, arch, mode):
    model = tiny_mlm(arch, tok, dtype=torch.float64, seed=5)
    head = model.cls.predictions if arch == "bert" else model.lm_head
    assert head.bias is head.decoder.bias  # registered twice: one parameter, one entry
    assert model.get_input_embeddings().weight is head.decoder.weight  # tied to the word embeddings
    enc = encode_prompt(tok, PAIR_RECORDS + PAIR_RECORDS[:1], "mnli", 64, spec=PAIR)
    batch = collate_prompt(enc, tok.pad_token_id, "cpu")
    B = len(enc)
    loss_fn = lambda: per_example_loss_prompt(model, batch)  # noqa: E731

    engine = GhostClipEngine(model, clip_norm=0.05, mode=mode)
    unique = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(engine.params) == len(unique)
    want = brute_force_norms(engine.params, loss_fn)

    with engine.capture(batch_size=B):
        losses = loss_fn()
    torch.testing.assert_close(engine.per_example_norms(losses), want, rtol=1e-5, atol=0)
    with engine.capture(batch_size=B):
        losses = loss_fn()
    engine.verify(losses)

    # the clipped sum written into .grad is the brute-force clipped sum
    engine.zero_grad()
    with engine.capture(batch_size=B):
        losses = loss_fn()
    norms = engine.backward(losses)
    assert (norms > 0.05).all()
    factors = (0.05 / (want + 1e-6)).clamp(max=1.0)
    ref = torch.autograd.grad((loss_fn() * factors).sum(), engine.params, allow_unused=True)
    for p, r in zip(engine.params, ref):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if r is None else r, rtol=1e-5, atol=1e-10,
                                   msg=engine.param_names[id(p)])
    engine.detach()


class SharedBiasHead(nn.Module):
    """A head holding its decoder's bias a second time (as BERT/RoBERTa do), plus an optional own scale."""

    def __init__(self, scale: bool):
        super().__init__()
        self.decoder = nn.Linear(3, 4)
        self.bias = self.decoder.bias
        self.scale = nn.Parameter(torch.ones(4)) if scale else None

    def forward(self, x):
        y = self.decoder(x)
        return y * self.scale if self.scale is not None else y


def test_shared_parameter_is_covered_but_unhandled_parameters_still_raise():
    engine = GhostClipEngine(SharedBiasHead(scale=False), clip_norm=1.0)
    assert sorted(engine.param_names.values()) == ["decoder.bias", "decoder.weight"]
    with pytest.raises(UnsupportedLayerError, match=r"module '' of type .*SharedBiasHead.* \[scale\]"):
        GhostClipEngine(SharedBiasHead(scale=True), clip_norm=1.0)


class OnlyUnhooked(nn.Module):
    """A parameter shared between two modules neither of which has a handler."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.inner = nn.Module()
        self.inner.w = self.w

    def forward(self, x):
        return x * self.w


def test_parameter_shared_only_by_unhandled_modules_raises():
    with pytest.raises(UnsupportedLayerError, match=r"OnlyUnhooked.*\[w\]"):
        GhostClipEngine(OnlyUnhooked(), clip_norm=1.0)
