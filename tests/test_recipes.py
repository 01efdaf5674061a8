"""The authors' recipes: weight decay that skips bias and LayerNorm, the whole-gradient clip, the Fisher
pass's mode, and config/paper.yaml resolved run by run against the settings of the authors' code."""
import copy

import pytest
import torch
import yaml
from snakemake.utils import validate
from torch import nn

from conftest import ROOT
from privtune.childtuning.fisher import fisher_information
from privtune.pipeline import expand_runs, fisher_settings, fisher_source_token, run_settings
from privtune.training.optim import build_optimizer
from privtune.training.settings import RunSettings

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")
SST = [{"text_a": t, "text_b": None, "label": i % 2} for i, t in enumerate(
    ["a great film", "dull and slow", "wonderful acting", "a mess", "loved it", "boring", "superb", "awful"] * 4)]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.LayerNorm(self.dropout(self.dense(x)))


def test_weight_decay_skips_bias_and_layernorm_weights():
    """A zero gradient and AdamW: only the decayed group shrinks."""
    torch.manual_seed(0)
    m = Block()
    names = {id(p): n for n, p in m.named_parameters()}
    opt = build_optimizer("adamw", m.parameters(), lr=0.1, weight_decay=0.5, names=names,
                          no_decay=["bias", "LayerNorm.weight"])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"dense.weight"}
    # without the exemption every parameter decays
    opt = build_optimizer("adamw", m.parameters(), lr=0.1, weight_decay=0.5, names=names, no_decay=[])
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n != "LayerNorm.bias"}
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters() if n in before)


def test_a_run_passes_parameter_names_so_layernorm_and_bias_are_not_decayed(tmp_path, tiny_models, monkeypatch):
    """The training loop hands the optimizer the parameters' names: its two groups put every bias and LayerNorm
    weight of the tiny BERT at weight decay 0 and the rest at the run's."""
    from privtune.io import write_jsonl
    from privtune.training import loop

    groups = []
    real = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **k: groups.append(k) or real(*a, **k))
    write_jsonl(tmp_path / "train.jsonl", SST)
    s = RunSettings(kind="classification", batch_size=16, physical_batch_size=16, steps=1, lr=1e-3,
                    optimizer="adamw", weight_decay=0.1, max_length=32, sampling="shuffle")
    loop.run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    names = groups[0]["names"]
    assert groups[0]["no_decay"] == ["bias", "LayerNorm.weight"]
    assert any(n.endswith("LayerNorm.weight") for n in names.values()) and any(n.endswith(".bias") for n in
                                                                               names.values())


def test_max_grad_norm_must_be_positive():
    with pytest.raises(ValueError, match="max_grad_norm"):
        RunSettings(kind="classification", max_grad_norm=-1.0)


def test_the_whole_gradient_clip_bounds_the_step(tmp_path, tiny_models):
    """max_grad_norm: with SGD at lr 1, one step moves the parameters by at most the clip."""
    from safetensors.torch import load_file

    from privtune.io import write_jsonl
    from privtune.training.loop import run

    write_jsonl(tmp_path / "train.jsonl", SST)
    bert = tiny_models / "bert"

    def moved(**kw):
        s = RunSettings(kind="classification", batch_size=16, physical_batch_size=16, steps=1, lr=1.0,
                        optimizer="sgd", max_length=32, sampling="shuffle", **kw)
        out = tmp_path / str(kw)
        run(s, bert, tmp_path / "train.jsonl", out, progress=False)
        start = load_file(next(bert.glob("*.safetensors")))  # the prepared weights (no head, no pooler)
        end = load_file(next((out / "model").glob("*.safetensors")))
        common = [k for k in end if k in start]
        assert len(common) > 10
        return sum(float((end[k] - start[k]).pow(2).sum()) for k in common) ** 0.5

    assert moved(max_grad_norm=1e-3) <= 1e-3 * 1.001
    assert moved() > 1e-2


def test_the_fisher_pass_runs_in_the_mode_asked():
    """train: dropout on (Xu et al.'s calculate_fisher), reproducible under a seed; eval: off."""
    def scores(mode, seed=0):
        torch.manual_seed(0)
        m = Block()
        torch.manual_seed(seed)
        batches = [torch.randn(8, 4) for _ in range(3)]
        return fisher_information(m, batches, lambda mod, b: mod(b).pow(2).mean(1), lambda n: True, mode=mode)

    a, b, e = scores("train"), scores("train"), scores("eval")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], e[n]) for n in a)
    with pytest.raises(ValueError, match="fisher_mode"):
        scores("inference")


# ------------------------------------------------------------------------------------ config/paper.yaml

@pytest.fixture(scope="module")
def paper():
    cfg = yaml.safe_load(open(ROOT / "config/paper.yaml"))
    validate(cfg, SCHEMA)  # fills the schema's defaults
    return cfg


def _runs(cfg, experiment):
    runs = [r for r in expand_runs(cfg) if r.experiment == experiment]
    assert runs, experiment
    return [(r, run_settings(cfg, r)) for r in runs]


@pytest.mark.parametrize("experiment,batch,epochs", [("li2022-glue", 1000, 3), ("li2022-qnli", 2000, 6),
                                                     ("li2022-mnli", 6000, 18), ("li2022-qqp", 6000, 18)])
def test_paper_li_classification_is_the_authors_recipe(paper, experiment, batch, epochs):
    """run_wrapper.py@03f651f: B = 1,000 × factor, 3 × factor epochs, lr 5e-4, linear decay, no warm-up,
    no weight decay, C = 0.1, DP and non-private alike; the prompt objective."""
    for r, s in _runs(paper, experiment):
        assert (s["batch_size"], s["epochs"], s["lr"], s["lr_schedule"]) == (batch, epochs, 5e-4, "linear"), r
        assert s["warmup_ratio"] == 0 and s["weight_decay"] == 0 and s["objective"] == "prompt"
        assert s["sampling"] == ("poisson" if r.private else "shuffle")
        if r.private:
            assert s["clip_norm"] == 0.1 and s["optimizer"] == "adam"


def test_paper_label_words_and_templates_are_the_authors(paper):
    """run_classification.py@178acf1: lower-case label words; run_wrapper.py's QQP template."""
    from privtune.objectives.templates import mlm_spec

    want = {"li2022-glue": ("*cls**sent_0*_It_was*mask*.*sep+*", ("terrible", "great")),
            "li2022-qnli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", ("yes", "no")),
            "li2022-mnli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", ("yes", "maybe", "no")),
            "li2022-qqp": ("*cls**sent-_0**mask*,*+sentl_1**sep+*", ("no", "yes"))}
    for experiment, (template, words) in want.items():
        for r, s in _runs(paper, experiment):
            spec = mlm_spec(r.task, s["prompt"])
            assert (spec.template, tuple(spec.label_words)) == (template, words), experiment


def test_paper_child_tuning_is_the_authors_recipe(paper):
    """AliceMind ChildTuning (run.sh, ChildTuningD.py @c17b177; issue #28 for p_F / p_D)."""
    per_task = {"cola": (0.2, 0.2), "rte": (0.3, 0.3), "mrpc": (0.4, 0.1), "stsb": (0.2, 0.2)}
    seen = set()
    for task, (p_f, p_d) in per_task.items():
        for r, s in _runs(paper, f"xu2021-{task}"):
            assert (s["batch_size"], s["epochs"], s["max_length"]) == (16, 3, 128)
            assert (s["optimizer"], s["lr_schedule"], s["warmup_ratio"], s["weight_decay"]) == (
                "adamw", "linear", 0.1, 0.01)
            assert s["no_decay"] == ["bias", "LayerNorm.weight"] and s["max_grad_norm"] == 1.0
            assert s["sampling"] == "shuffle"
            if r.method == "ct_f":
                assert s["p_f"] == p_f
            if r.method == "ct_d":
                e = r.exp(paper)
                f = fisher_settings(paper, task, r.model, fisher_source_token(e), e["child"]["p_d"], r.seed)
                assert (f["p_d"], f["mode"], f["batch_size"], f["source"]) == (p_d, "train", 16, "train")
            seen.add((task, r.method))
    assert len(seen) == 12


def test_paper_preset_without_the_recipe_fails_these_checks(paper):
    """The checks above can fail: the Xu runs without max_grad_norm, or with the constant lr, are caught."""
    cfg = copy.deepcopy(paper)
    for e in cfg["experiments"]:
        if e["name"].startswith("xu2021"):
            e["train"] = {**e["train"], "max_grad_norm": None}
    with pytest.raises(AssertionError):
        test_paper_child_tuning_is_the_authors_recipe(cfg)
    cfg = copy.deepcopy(paper)
    next(e for e in cfg["experiments"] if e["name"] == "li2022-qnli")["train"]["lr_schedule"] = "constant"
    with pytest.raises(AssertionError):
        test_paper_li_classification_is_the_authors_recipe(cfg, "li2022-qnli", 2000, 6)


E2E = [{"source": "name : Aromi | food : Thai", "references": ["Aromi serves Thai food."]},
       {"source": "name : Blue Spice | area : riverside", "references": ["Blue Spice is by the river."]}] * 4


def test_untie_lm_head_gives_the_head_its_own_copy_and_both_train(tmp_path, tiny_models):
    """Li et al.'s table-to-text code: the embedding copied into a separate head; under DP both train (the
    engine's verification at the first step sees every parameter), and the saved model stays untied."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from privtune.io import write_jsonl
    from privtune.models import methods
    from privtune.training.loop import run

    m = AutoModelForCausalLM.from_pretrained(tiny_models / "llama")
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # the tiny Llama is tied
    assert methods.untie_lm_head(m) and not methods.untie_lm_head(m)  # a separate head is left alone
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    assert torch.equal(m.get_output_embeddings().weight, m.get_input_embeddings().weight)

    write_jsonl(tmp_path / "train.jsonl", E2E)
    s = RunSettings(kind="table2text", epsilon=8.0, delta=1e-3, batch_size=4, steps=2, lr=1e-2, max_length=64,
                    untie_lm_head=True)
    res = run(s, tiny_models / "llama", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    w = load_file(tmp_path / "run/model/model.safetensors")
    assert "lm_head.weight" in w and not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])
    tied = AutoModelForCausalLM.from_pretrained(tiny_models / "llama")
    assert res["train"]["trainable_parameters"] == sum(p.numel() for p in tied.parameters()) + tied.lm_head.weight.numel()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
    assert again.get_output_embeddings().weight is not again.get_input_embeddings().weight


def test_decoding_never_emits_a_line_break(tiny_models):
    """ban_newlines (Li et al.'s decoding bans GPT-2's newline tokens): the byte tokenizer's newline byte is
    among the banned tokens, and a model pushed to emit it emits something else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from privtune.objectives.head import generate, newline_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_models / "llama")
    nl = newline_token_ids(tok)
    assert nl and all("\n" in tok.decode([i]) for i in nl)
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "llama")
    a = tok("a", add_special_tokens=False)["input_ids"][-1]
    bias = torch.zeros(model.config.vocab_size)
    bias[nl[0]], bias[a] = 1e4, 1e3  # a newline first, "a" second, at every position
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + bias)
    free = generate(model, tok, ["name : Aromi"], torch.device("cpu"), max_new_tokens=4, ban_newlines=False)
    banned = generate(model, tok, ["name : Aromi"], torch.device("cpu"), max_new_tokens=4)
    assert free == [""]  # four line breaks, stripped
    assert banned == ["aaaa"]


def test_paper_table_to_text_is_the_authors_recipe(paper):
    """private-transformers examples/table2text: run.sh (lr, epochs, δ, constant lr, B 1,024), the untied head,
    non-private runs with the same settings, and the decoding (beam 5, 100 new tokens, newlines banned)."""
    want = {"e2e": (2e-3, 10, "auto"), "dart": (5e-4, 15, 1e-5)}
    seen = 0
    for e in paper["experiments"]:
        if e["paper"] != "li2022" or e["task"] not in want:
            continue
        lr, epochs, delta = want[e["task"]]
        for r, s in _runs(paper, e["name"]):
            assert (s["lr"], s["epochs"], s["batch_size"], s["lr_schedule"]) == (lr, epochs, 1024, "constant"), r
            assert s["untie_lm_head"] is True and s["delta"] == delta
            g = r.eval_spec(paper)["generation"]
            assert (g["num_beams"], g["max_new_tokens"], g["ban_newlines"]) == (5, 100, True)
            seen += 1
    assert seen == 2 * 3 * 3 + 2 * 4 * 3  # full on three GPT-2 sizes, and four methods on GPT-2, × 3 ε
