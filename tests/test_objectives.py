"""The prompt objective's causal-LM and sentence-encoder forms: family detection, loss and
prediction, exact ghost clipping (float64 brute force), and length-sorted physical batches."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM

from privtune.models.architectures import tiny_config
from privtune.dp.engine import GhostClipEngine
from privtune.dp.noise import privatize_
from privtune.dp.sampling import physical_batches
from privtune.models.prepare import byte_tokenizer
from privtune.objectives import causal, objective, prompt_family, similarity
from privtune.objectives.mlm import PromptObjectiveError

RECORDS = [
    {"text_a": "a fine film", "label": 1},
    {"text_a": "dull and far too long for what it is", "label": 0},
    {"text_a": "ok", "label": 1},
    {"text_a": "the worst thing I saw this year, by far", "label": 0},
    {"text_a": "warm", "label": 1},
]
SPEC = causal.CausalSpec("Review: {a}\nSentiment:", ("-", "+"))  # byte tokenizer: single characters


def tiny(arch, cls, tok, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    return cls.from_config(cfg, dtype=dtype)


def brute_force_norms(params, losses):
    norms = []
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    return torch.stack(norms)


def check_exact(model, loss_fn, clip=0.05):
    """Per-example norms and the clipped sum of the engine equal brute force (float64, 1e-5)."""
    engine = GhostClipEngine(model, clip_norm=clip)
    assert len(engine.params) == len({id(p) for p in model.parameters() if p.requires_grad})
    want = brute_force_norms(engine.params, loss_fn())
    assert (want > 0).all()
    with engine.capture(batch_size=len(want)):
        losses = loss_fn()
    torch.testing.assert_close(engine.per_example_norms(losses), want, rtol=1e-5, atol=0)
    with engine.capture(batch_size=len(want)):
        losses = loss_fn()
    engine.verify(losses)
    engine.zero_grad()
    with engine.capture(batch_size=len(want)):
        losses = loss_fn()
    engine.backward(losses)
    factors = (clip / (want + 1e-6)).clamp(max=1.0)
    ref = torch.autograd.grad((loss_fn() * factors).sum(), engine.params, allow_unused=True)
    for p, r in zip(engine.params, ref):
        r = torch.zeros_like(p) if r is None else r
        # elementwise 1e-5, and 1e-6 of the largest entry for entries near zero
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()) + 1e-15,
                                   msg=engine.param_names[id(p)])
    engine.detach()


# -- family detection ----------------------------------------------------------------------
@pytest.mark.parametrize("archs,family", [(["BertForMaskedLM"], "mlm"), (["LlamaForCausalLM"], "causal"),
                                          (["GPT2LMHeadModel"], "causal"), (["BertModel"], "similarity")])
def test_family_is_read_from_the_model_folder(tmp_path, archs, family):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs}))
    assert prompt_family(tmp_path) == family
    assert objective("classification", "sst2", "prompt", model_dir=tmp_path).family == family
    assert objective("classification", "sst2", "prompt", prompt={"family": "mlm"}, model_dir=tmp_path).family == "mlm"


def test_similarity_refuses_pair_tasks_and_causal_unknown_tasks():
    with pytest.raises(PromptObjectiveError, match="pair tasks"):
        objective("classification", "rte", "prompt", prompt={"family": "similarity"})
    with pytest.raises(PromptObjectiveError, match="no causal-LM template"):
        objective("classification", "unknown_task", "prompt", prompt={"family": "causal"})


# -- causal LM -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_loss_is_the_next_token_cross_entropy_of_the_full_model(arch):
    tok = byte_tokenizer(arch)
    model = tiny(arch, AutoModelForCausalLM, tok, dtype=torch.float32).eval()
    enc = causal.encode(tok, RECORDS, "sst2", 24, SPEC)
    assert all(len(e.input_ids) <= 24 for e in enc)
    assert tok.decode(enc[0].input_ids).endswith("Sentiment:")  # the template is never cut
    assert tok.decode(enc[1].input_ids).endswith("Sentiment:")  # (this one's sentence is)
    batch = causal.collate(enc, tok.pad_token_id, "cpu")
    words = list(causal.label_word_ids(tok, SPEC, "sst2"))
    with torch.no_grad():
        for i, e in enumerate(enc):  # each example alone, no padding, every position through the head
            full = model(input_ids=torch.tensor([e.input_ids])).logits[0, -1, words]
            torch.testing.assert_close(causal.label_word_logits(model, batch)[i], full, rtol=1e-4, atol=1e-5)
        want = F.cross_entropy(causal.label_word_logits(model, batch), batch["labels"], reduction="none")
        torch.testing.assert_close(causal.per_example_loss(model, batch), want)


def test_causal_multi_token_label_word_is_an_error_naming_it():
    tok = byte_tokenizer("llama")
    with pytest.raises(ValueError, match="'ab' is 2 tokens"):
        causal.encode(tok, RECORDS, "sst2", 32, causal.CausalSpec("{a}:", ("ab", "c")))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ghost_clipping_is_exact_under_the_causal_prompt_loss(float64, arch):
    tok = byte_tokenizer(arch)
    model = tiny(arch, AutoModelForCausalLM, tok, seed=3).eval()  # no dropout: one function for both
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied head
    batch = causal.collate(causal.encode(tok, RECORDS, "sst2", 40, SPEC), tok.pad_token_id, "cpu")
    check_exact(model, lambda: causal.per_example_loss(model, batch))


# -- sentence encoder ----------------------------------------------------------------------
def test_similarity_logits_are_scaled_cosines_of_mean_pooled_embeddings():
    tok = byte_tokenizer("bert")
    model = tiny("bert", AutoModel, tok, dtype=torch.float32).eval()
    enc = similarity.encode(tok, RECORDS, "sst2", 64, ("bad", "good"), 2)
    batch = similarity.collate(enc, tok.pad_token_id, "cpu")
    with torch.no_grad():
        def emb(text):
            ids = torch.tensor([tok(text)["input_ids"]])
            return model(input_ids=ids).last_hidden_state[0].mean(0)
        labels = torch.stack([emb("bad"), emb("good")])
        for i, r in enumerate(RECORDS):
            want = F.cosine_similarity(emb(r["text_a"])[None], labels) / 0.05
            torch.testing.assert_close(similarity.logits(model, batch)[i], want, rtol=1e-4, atol=1e-4)


def test_similarity_label_embeddings_carry_no_gradient_and_keep_train_mode():
    tok = byte_tokenizer("bert")
    model = tiny("bert", AutoModel, tok, dtype=torch.float32).train()
    batch = similarity.collate(similarity.encode(tok, RECORDS, "sst2", 32, ("bad", "good"), 2), tok.pad_token_id,
                               "cpu")
    losses = similarity.per_example_loss(model, batch)
    assert model.training and losses.shape == (len(RECORDS),) and losses.requires_grad


def test_ghost_clipping_is_exact_under_the_similarity_loss(float64):
    tok = byte_tokenizer("bert")
    torch.manual_seed(4)
    cfg = tiny_config("bert", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = AutoModel.from_config(cfg, add_pooling_layer=False, dtype=torch.float64)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.eval()  # deterministic forward passes: brute force and engine see the same function
    batch = similarity.collate(similarity.encode(tok, RECORDS, "sst2", 32, ("bad", "good"), 2),
                               tok.pad_token_id, "cpu")
    check_exact(model, lambda: similarity.per_example_loss(model, batch))


@pytest.mark.parametrize("anchors", ["fixed", "live"])
def test_ghost_clipping_is_exact_under_the_similarity_loss_with_either_anchors(float64, anchors):
    tok = byte_tokenizer("bert")
    torch.manual_seed(5)
    cfg = tiny_config("bert", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = AutoModel.from_config(cfg, add_pooling_layer=False, dtype=torch.float64).eval()
    obj = objective("classification", "sst2", "prompt", 2, {"family": "similarity", "anchors": anchors})
    obj.prepare(model, tok, "cpu")
    assert (similarity.fixed_anchors(model) is not None) == (anchors == "fixed")
    batch = obj.collate(obj.encode(tok, RECORDS, 32), tok.pad_token_id, "cpu")
    check_exact(model, lambda: obj.loss(model, batch))


def test_fixed_anchors_stay_where_the_prepared_encoder_put_them(tmp_path):
    """Taken once before training, kept while the encoder moves, saved for the evaluation; the live cosine
    of the descriptions is what the training log records."""
    tok = byte_tokenizer("bert")
    model = tiny("bert", AutoModel, tok, dtype=torch.float32).train()
    obj = objective("classification", "sst2", "prompt", 2, {"family": "similarity"})
    obj.prepare(model, tok, "cpu")
    before = similarity.fixed_anchors(model).clone()
    cos0 = obj.step_record(model, tok, "cpu")["anchor_cosine"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    torch.testing.assert_close(similarity.fixed_anchors(model), before)  # unmoved
    assert obj.step_record(model, tok, "cpu")["anchor_cosine"] != cos0  # the live embeddings moved
    batch = obj.collate(obj.encode(tok, RECORDS, 32), tok.pad_token_id, "cpu")
    model.eval()  # no dropout: the two forward passes below are one function
    x = similarity.embed(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(similarity.logits(model, batch), x @ before.T / 0.05)
    obj.save(model, tmp_path)
    fresh = tiny("bert", AutoModel, tok, seed=1, dtype=torch.float32)
    obj.prepare(fresh, tok, "cpu", tmp_path)  # an evaluation reads the anchors the run trained against
    torch.testing.assert_close(similarity.fixed_anchors(fresh), before)


# -- length-sorted physical batches ----------------------------------------------------------
def test_physical_batches_respect_both_limits_and_keep_every_example():
    lengths = [5, 50, 7, 12, 3, 49, 8, 8, 20]
    parts = physical_batches(range(9), lengths, max_examples=3, max_tokens=40)
    assert sorted(i for p in parts for i in p) == list(range(9))
    for p in parts:
        assert len(p) <= 3
        assert len(p) == 1 or len(p) * max(lengths[i] for i in p) <= 40
    assert physical_batches([4, 2, 7], lengths, 2) == [[4, 2], [7]]  # no budget: consecutive slices
    with pytest.raises(ValueError, match="physical_tokens"):
        physical_batches([1], lengths, 2, 0)


def test_privatized_gradient_does_not_depend_on_the_split(float64):
    tok = byte_tokenizer("llama")
    model = tiny("llama", AutoModelForCausalLM, tok, seed=1)
    records = RECORDS * 3
    enc = causal.encode(tok, records, "sst2", 48, SPEC)
    lengths = [len(e.input_ids) for e in enc]
    engine = GhostClipEngine(model, clip_norm=0.1)
    results = []
    for max_examples, max_tokens in [(len(enc), None), (4, None), (1, None), (16, 60), (16, 130), (3, 90)]:
        engine.zero_grad()
        for part in physical_batches(range(len(enc)), lengths, max_examples, max_tokens):
            batch = causal.collate([enc[i] for i in part], tok.pad_token_id, "cpu")
            with engine.capture(batch_size=len(part)):
                losses = causal.per_example_loss(model, batch)
            engine.backward(losses)
        gen = torch.Generator().manual_seed(7)
        privatize_(engine.params, 0.8, 0.1, len(enc), gen)
        results.append([p.grad.clone() for p in engine.params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    engine.detach()


# -- table-to-text with an instruct model's chat format -------------------------------------
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_instruct_tokenizer_gets_its_chat_format_and_no_bare_eos_separator():
    from privtune.objectives import head

    tok = byte_tokenizer("llama")
    plain = head.encode_table2text(tok, [{"source": "a | b", "references": ["X."]}], 64)[0]
    assert tok.decode(plain.input_ids) == "a | b</s> X.</s>"  # Li et al.'s format without a chat template
    tok.chat_template = CHAT
    prompt = head.lm_prompt(tok, "a | b")
    assert tok.decode(prompt) == (f"<s>system\n{head.TABLE2TEXT_INSTRUCTION}</s>\n<s>user\na | b</s>\n"
                                  "<s>assistant\n")
    enc = head.encode_table2text(tok, [{"source": "a | b", "references": ["X."]}], 128)[0]
    assert enc.input_ids[: len(prompt)] == prompt
    assert tok.decode(enc.input_ids[len(prompt):]) == "X.</s>"  # the turn: text, then end-of-turn
    assert enc.labels[: len(prompt)] == [head.IGNORE] * len(prompt)


TOY_FAMILY = '''
import torch
from privtune.objectives.family import Family
from privtune.objectives.head import collate, encode


class Toy(Family):
    """A made-up family: the head's batches, a loss of the number of tokens per example."""

    def encode(self, tokenizer, records, max_length):
        return encode(tokenizer, records, "classification", max_length)

    def collate(self, examples, pad_id, device):
        return collate(examples, pad_id, "classification", device)

    def loss(self, model, batch):
        return batch["attention_mask"].sum(1).double()

    def logits(self, model, batch):
        return torch.stack([-batch["attention_mask"].sum(1), batch["attention_mask"].sum(1)], 1).double()
'''


def test_a_new_family_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from privtune.objectives import family

    (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="registered prompt family"):
        objective("classification", "sst2", "prompt", prompt={"family": "toy"})
    monkeypatch.setitem(family.REGISTRY, "toy", family.Registered("toy_family:Toy", "nothing"))
    obj = objective("classification", "sst2", "prompt", prompt={"family": "toy"})
    assert type(obj.impl).__name__ == "Toy" and obj.family == "toy"
    tok = byte_tokenizer("bert")
    enc = obj.encode(tok, RECORDS, 64)
    batch = obj.collate(enc, tok.pad_token_id, "cpu")
    assert obj.loss(None, batch).tolist() == [float(len(e.input_ids)) for e in enc]
    assert obj.predict(torch.nn.Identity(), enc, tok.pad_token_id, "cpu", batch_size=2) == [1] * len(enc)  # the base
    assert obj.step_record(None, tok, "cpu") == {}  # class's defaults


def test_every_registered_family_implements_the_interface():
    from privtune.objectives import family

    for name in family.REGISTRY:
        cls = family.family_class(name)
        assert issubclass(cls, family.Family)
        for method in ("load", "encode", "collate", "loss"):
            assert getattr(cls, method) is not getattr(family.Family, method), (name, method)
        assert cls.predict is not family.Family.predict or cls.logits is not family.Family.logits, name
