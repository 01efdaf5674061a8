"""Li et al.'s fine-tuning methods (full, LoRA, prefix, top2, retrain) under the ghost-clipping engine.

Per-example norms and the clipped sum of every parameter a method trains are compared
with brute force (one backward per example) in float64, 1e-5 relative.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from privtune.models import methods
from privtune.models.architectures import tiny_config
from privtune.dp.engine import GhostClipEngine

from test_ghost_engine import _batch, brute_force

B = 4


pytestmark = pytest.mark.usefixtures("float64")  # every test in float64 (conftest; restored after each)


def check(model, loss_fn, clip=0.05, mode="bk"):
    """Per-example norms (1e-5 relative each) and the clipped sum (1e-5 relative per tensor) against brute
    force. Per tensor, not per element: LlamaRMSNorm computes in float32 even in a float64 model, so
    autograd's own per-example gradients carry float32 rounding (~1e-7 relative) on near-zero entries."""
    engine = GhostClipEngine(model, clip_norm=clip, mode=mode)
    want_norms, want_sum = brute_force(engine.params, loss_fn, clip)
    engine.zero_grad()
    with engine.capture(batch_size=B):
        losses = loss_fn()
    norms = engine.backward(losses)
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0)
    scale = torch.sqrt(sum(w.pow(2).sum() for w in want_sum))
    for p, w in zip(engine.params, want_sum):
        # an attention key bias has zero gradient in exact arithmetic (softmax ignores a shift): rounding
        # on both sides, compared at the scale of the whole gradient
        err = float((p.grad - w).norm() / (w.norm() + 1e-6 * scale))
        assert err < 1e-5, (engine.param_names[id(p)], err)
    assert (norms > clip).any(), "vacuous unless some examples are clipped"
    engine.detach()
    return engine


def causal(arch, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float64)
    model.eval()
    return model


def lm_loss(model, arch):
    pad = model.config.pad_token_id or 0
    ids, mask = _batch(128, pad, seed=3)

    def loss():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:][:, :-1]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].to(tok.dtype)
        return (tok * m).sum(1) / m.sum(1)

    return loss


def nudge_(model):
    """Move every trainable parameter off its initial value: LoRA's B and zero-init prefixes start at 0,
    where some gradients vanish and a test would be vacuous."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_lora_norms_equal_brute_force(arch, mode):
    model = methods.apply(causal(arch), "lora", "table2text", {"r": 4, "alpha": 8})
    nudge_(model)
    eng = check(model, lm_loss(model, arch), clip=0.05, mode=mode)
    names = set(eng.param_names.values())
    assert names and all("lora_A" in n or "lora_B" in n for n in names), names
    assert any("lora_B" in n for n in names)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [True, False])
def test_prefix_norms_equal_brute_force(arch, projection):
    model = methods.apply(causal(arch), "prefix", "table2text",
                          {"num_virtual_tokens": 3, "projection": projection, "hidden": 16})
    nudge_(model)
    eng = check(model, lm_loss(model, arch), clip=0.05)
    names = set(eng.param_names.values())
    assert any("prompt_encoder" in n and n.endswith("embedding.weight") for n in names), names
    assert all("prompt_encoder" in n for n in names), names
    assert any("transform" in n for n in names) == projection


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("head", [True, False])
def test_top2_trains_last_blocks_norm_and_head(arch, head):
    model = methods.apply(causal(arch), "top2", "table2text", {"layers": 1, "head": head})
    eng = check(model, lm_loss(model, arch), clip=0.05)
    names = set(eng.param_names.values())
    blocks = "transformer.h." if arch == "gpt2" else "model.layers."
    assert any(n.startswith(blocks + "1.") for n in names)
    assert not any(n.startswith(blocks + "0.") for n in names)
    final_norm = "transformer.ln_f.weight" if arch == "gpt2" else "model.norm.weight"
    assert final_norm in names
    word = model.get_input_embeddings().weight
    assert word.requires_grad == head  # the tied head is the word embedding
    assert "transformer.wpe.weight" not in names


@pytest.mark.parametrize("method", ["lora", "prefix", "top2"])
def test_classification_heads_train_under_every_method(method):
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=3), dtype=torch.float64)
    model.eval()
    opts = {"lora": {"r": 2}, "prefix": {"num_virtual_tokens": 2, "hidden": 8}, "top2": {"layers": 1}}[method]
    model = methods.apply(model, method, "classification", opts)
    nudge_(model)
    ids, mask = _batch(128, 0)
    labels = torch.tensor([0, 1, 2, 1])
    loss = lambda: torch.nn.functional.cross_entropy(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    eng = check(model, loss, clip=0.05)
    names = set(eng.param_names.values())
    assert any("classifier" in n for n in names), names
    if method == "top2":
        assert "bert.pooler.dense.weight" in names and "bert.encoder.layer.1.output.dense.weight" in names
        assert not any(n.startswith("bert.encoder.layer.0.") for n in names)
        assert not any("embeddings" in n for n in names)


def test_frozen_parameters_get_no_hooks():
    model = methods.apply(causal("llama"), "lora", "table2text", {"r": 2})
    engine = GhostClipEngine(model, clip_norm=1.0)
    trainable, total = methods.count_parameters(model)
    assert sum(p.numel() for p in engine.params) == trainable < total / 5
    assert all("lora_" in name for name in engine._layers)


def test_retrain_is_random_and_seeded():
    base = causal("llama", seed=0)
    a = methods.apply(causal("llama", seed=0), "retrain", "table2text", seed=1)
    b = methods.apply(causal("llama", seed=0), "retrain", "table2text", seed=1)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], base.state_dict()[w])
    assert a.get_input_embeddings().weight is a.get_output_embeddings().weight


def test_a_method_leaving_nothing_to_train_is_an_error():
    stack = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.ModuleList([torch.nn.Linear(3, 3)] * 2))
    with pytest.raises(methods.MethodError, match="leaves no trainable parameter"):
        methods.apply(stack, "top2", "table2text", {"layers": 0})
    with pytest.raises(methods.MethodError, match="layers = 5, but the model has 2 blocks"):
        methods.apply(causal("gpt2"), "top2", "table2text", {"layers": 5})
    frozen = causal("gpt2").requires_grad_(False)
    with pytest.raises(methods.MethodError, match="'full'.*leaves no trainable parameter"):
        methods.apply(frozen, "full", "table2text")
    with pytest.raises(methods.MethodError, match="target_modules"):
        methods.apply(causal("gpt2"), "lora", "table2text", {"target_modules": ["no_such_layer"]})
    with pytest.raises(methods.MethodError, match="unknown key"):
        methods.options("lora", {"rank": 4})
    with pytest.raises(methods.MethodError, match="unknown fine-tuning method"):
        methods.options("bitfit")


def test_engine_refuses_a_model_with_nothing_trainable():
    model = causal("gpt2")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GhostClipEngine(model, clip_norm=1.0)


@pytest.mark.parametrize("method", ["lora", "prefix", "top2"])
def test_saved_model_reloads_with_the_same_outputs(method, tmp_path):
    """LoRA is merged into plain weights; a prefix is saved as a peft adapter beside the base weights and
    attached on load; either way the reloaded model computes what the trained one did."""
    model = methods.apply(causal("llama"), method, "table2text", {"lora": {"r": 2}, "prefix": {"hidden": 8},
                                                                  "top2": {"layers": 1}}[method])
    nudge_(model)
    model.eval()
    ids, mask = _batch(128, 0, seed=4)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    methods.save_trained(model, method, tmp_path)
    assert (tmp_path / methods.ADAPTER_DIR / "adapter_config.json").exists() == (method == "prefix")
    loaded = methods.attach_adapter(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64), tmp_path)
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert methods.count_parameters(loaded)[1] >= methods.count_parameters(causal("llama"))[1]
