"""Model configurations built offline: tiny random models for tests and the tiny
preset, and the paper models' shapes (random weights) for speed/memory benchmarks.

Weights do not change FLOPs or bytes, so a benchmark on ``paper_config("gpt2-large")``
measures what the real gpt2-large costs, with no download.
"""
from __future__ import annotations

from transformers import AutoConfig, BertConfig, GPT2Config, LlamaConfig, PretrainedConfig, RobertaConfig

ARCHS = ("bert", "roberta", "gpt2", "llama")

# Shapes of the papers' models (from their published configs), so that a random-init
# model of the same size can be built without the hub.
PAPER_SHAPES: dict[str, dict] = {
    "gpt2": dict(arch="gpt2", n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(arch="gpt2", n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(arch="gpt2", n_embd=1280, n_layer=36, n_head=20),
    "roberta-base": dict(arch="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072),
    "roberta-large": dict(arch="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096),
    "bert-large-cased": dict(arch="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, vocab_size=28996),
}


def tiny_config(arch: str, vocab_size: int = 128, **overrides) -> PretrainedConfig:
    """A random-init config of ``arch`` small enough for a CPU test (a few 10k parameters)."""
    if arch == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
    elif arch == "roberta":
        cfg = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=130, pad_token_id=1, type_vocab_size=1)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                          tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def paper_config(name: str) -> PretrainedConfig:
    """The config of a paper model (gpt2, roberta-large, ...), built offline."""
    if name not in PAPER_SHAPES:
        raise ValueError(f"no offline shape for model {name!r}; known: {sorted(PAPER_SHAPES)}")
    shape = dict(PAPER_SHAPES[name])
    arch = shape.pop("arch")
    return AutoConfig.for_model(arch, **shape)
