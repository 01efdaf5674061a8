"""The clipping benchmark on a tiny shape: it runs, records failures as results, and computes ratios."""
import pytest

from privtune.bench import clipping as bench
from privtune.bench import measure, workload


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(workload.CPU_SHAPES, "tiny", dict(n_embd=32, n_layer=1, n_head=2))
    return "tiny"


@pytest.mark.parametrize("method", ["nonprivate", "ours_bk", "ours_ghost", "opacus_hooks", "opacus_ghost_untied"])
def test_each_method_runs_on_a_tiny_gpt2(tiny_shape, method):
    r = measure.measure_one(workload.CPU_SHAPES[tiny_shape], method, batch=2, seq=8, steps=1, device="cpu")
    assert r["status"] == "ok" and r["time_s"] > 0 and r["parameters"] > 0


def test_refusals_are_recorded_not_raised(tiny_shape, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ":".join(__import__("sys").path))
    r = bench.run_isolated("gpt2-2layer", "opacus_ghost", batch=1, seq=4, steps=1, device="cpu", timeout=300)
    assert r["status"] == "error" and "tying" in r["error"]  # Opacus 1.6 refuses tied embeddings


def test_ratios_are_relative_to_nonprivate():
    recs = [{"shape": "s", "batch": 2, "seq": 8, "method": "nonprivate", "status": "ok", "time_s": 2.0, "peak_mb": 100},
            {"shape": "s", "batch": 2, "seq": 8, "method": "ours_bk", "status": "ok", "time_s": 2.2, "peak_mb": 105},
            {"shape": "s", "batch": 2, "seq": 8, "method": "opacus_ghost", "status": "error", "error": "x"}]
    out = bench.with_ratios(recs)
    assert out[1]["time_ratio"] == pytest.approx(1.1) and out[1]["memory_ratio"] == pytest.approx(1.05)
    assert "time_ratio" not in out[2]


def test_interleaved_ratios_are_per_round_and_refusals_are_results(tiny_shape):
    got = measure.measure_interleaved(workload.CPU_SHAPES[tiny_shape], ["ours_bk", "opacus_ghost"], batch=2, seq=8,
                                    rounds=3, device="cpu")
    assert got["nonprivate"]["round_ratios"] == [1.0, 1.0, 1.0]
    r = got["ours_bk"]
    assert len(r["round_ratios"]) == 3 and r["time_ratio_interleaved"] == sorted(r["round_ratios"])[1] > 0
    assert "tying" in got["opacus_ghost"]["interleaved_error"]  # Opacus 1.6 refuses the tied model: recorded, not raised


def test_length_sorted_batches_benchmark_reports_its_token_bound(tmp_path, tiny_models):
    """bench_batches on a tiny model: both splits run the same logical batches; sorting never pads more."""
    from privtune.bench import batches
    from privtune.io import write_jsonl

    words = ["good", "bad", "a long and rather winding sentence about a film that went on and on", "ok"]
    write_jsonl(tmp_path / "train.jsonl", [{"text_a": words[i % 4], "text_b": None, "label": i % 2}
                                           for i in range(64)])
    r = batches.measure(tiny_models / "bert", tmp_path / "train.jsonl", batch=32, physical=8, tokens=128, rounds=1,
                prompt={"family": "similarity"})  # the byte tokenizer has no one-token label words
    assert r["padded_tokens_ratio"] >= 1.0 and r["logical_batch"] == 32
    assert set(r["examples_per_s"]) == {"padded", "length_sorted"} and min(r["examples_per_s"].values()) > 0


# -- the all-MiniLM SST-2 shape, precisions, grouped runs and the targets ------------------------------
TINY_BERT = dict(arch="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 vocab_size=30522, data="sst2", logical_batch=40, physical_batch=16, physical_tokens=256,
                 max_length=64)


def test_sst2_lengths_fall_back_to_the_documented_distribution(monkeypatch):
    monkeypatch.setattr(workload, "_sst2_texts", lambda: None)
    lengths, source = workload.sst2_lengths()
    assert source.startswith("fixed distribution") and len(lengths) == 67349  # SST-2's training sentences
    assert 13.2 < sum(lengths) / len(lengths) < 13.4 and min(lengths) == 3 and max(lengths) == 64
    assert workload.sst2_lengths(max_length=32)[0].count(32) > 1000  # truncated, as the encoder would


def test_wordpiece_approximation():
    assert workload.approx_wordpieces("a fine film") == 5  # [CLS] a fine film [SEP]
    assert workload.approx_wordpieces("unquestionably") == 2 + 2  # 14 characters: two pieces
    assert workload.approx_wordpieces(" ".join(["word"] * 100), max_length=64) == 64


def test_the_sst2_batch_is_length_sorted_physical_batches_under_the_token_budget(monkeypatch):
    monkeypatch.setattr(workload, "_sst2_texts", lambda: None)
    parts, info = workload.sst2_batches(TINY_BERT, "cpu")
    sizes = [p["input_ids"].shape for p in parts]
    assert sum(n for n, _ in sizes) == 40 and info["physical_batches"] == len(parts) > 1
    assert all(n <= 16 and n * t <= 256 for n, t in sizes)
    assert [t for _, t in sizes] == sorted(t for _, t in sizes)  # sorted by length: little padding
    assert info["padded_tokens"] == sum(n * t for n, t in sizes) >= info["tokens"]
    for p in parts:
        lengths = p["attention_mask"].sum(1)
        rows = range(p["input_ids"].shape[0])
        assert all(p["input_ids"][r, 0] == 101 and p["input_ids"][r, lengths[r] - 1] == 102 for r in rows)
        assert (p["input_ids"][p["attention_mask"] == 0] == 0).all()  # [PAD] beyond each sentence


@pytest.mark.parametrize("method", ["nonprivate", "ours_bk", "opacus_hooks", "opacus_ghost"])
def test_each_method_runs_on_a_tiny_bert_sst2_batch(method):
    r = measure.measure_one(TINY_BERT, method, batch=0, seq=0, steps=1, device="cpu")
    assert r["status"] == "ok" and r["time_s"] > 0 and r["physical_batches"] > 1 and r["mean_length"] > 3


@pytest.mark.parametrize("method", ["nonprivate", "ours_bk", "opacus_ghost_untied"])
def test_bf16_runs(tiny_shape, method):
    r = measure.measure_one(workload.CPU_SHAPES[tiny_shape], method, batch=2, seq=8, steps=1, device="cpu",
                          precision="bf16")
    assert r["status"] == "ok" and r["time_s"] > 0


def test_a_group_measures_every_method_in_one_process_and_searches_the_largest_batch(tiny_shape):
    spec = workload.CPU_SHAPES[tiny_shape]
    recs = list(measure.measure_group(spec, ["nonprivate", "ours_bk", "opacus_ghost"], batch=2, seq=8, steps=1,
                                    device="cpu", precision="fp32", fit={"limit": 8}, deadline=None))
    assert [r["method"] for r in recs] == ["nonprivate", "ours_bk", "opacus_ghost"]
    for r in recs[:2]:  # a CPU never runs out of memory: the search stops at the limit
        assert r["status"] == "ok" and r["largest_batch"] == 8 and r["largest_batch_stopped_by"] == "limit"
        assert r["peak_mb"] is None  # a CPU's peak RSS is not per method in a shared process
    assert recs[2]["status"] == "error" and "tying" in recs[2]["error"]
    late = list(measure.measure_group(spec, ["nonprivate"], 2, 8, 1, "cpu", "fp32", None, deadline=0.0))
    assert late == [{"method": "nonprivate", "status": "skipped (time budget)", "error": "no time left in the budget"}]


def test_run_group_returns_one_record_per_method(tiny_shape, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ":".join(__import__("sys").path))
    recs = bench.run_group("tiny", ["nonprivate", "ours_bk"], batch=2, seq=8, steps=1, device="cpu", timeout=300,
                           spec=workload.CPU_SHAPES[tiny_shape], precision="bf16")
    assert [(r["method"], r["status"], r["precision"], r["shape"]) for r in recs] == [
        ("nonprivate", "ok", "bf16", "tiny"), ("ours_bk", "ok", "bf16", "tiny")]


def test_ratios_are_per_precision_and_the_targets_read_them():
    def rec(method, prec, t, m, **kw):
        return {"shape": "s", "batch": 2, "seq": 8, "method": method, "precision": prec, "status": "ok",
                "time_s": t, "peak_mb": m, **kw}

    recs = bench.with_ratios([rec("nonprivate", "fp32", 2.0, 100), rec("nonprivate", "bf16", 1.0, 50),
                              rec("ours_bk", "fp32", 2.1, 104, time_ratio_interleaved=1.2),
                              rec("ours_bk", "bf16", 1.05, 60)])
    assert recs[2]["time_ratio"] == pytest.approx(1.05) and recs[3]["memory_ratio"] == pytest.approx(1.2)
    t = bench.targets(recs, ["s"])["ours_bk"]
    assert t["s/fp32"] == {"time_ratio": 1.2, "time_ratio_kind": "interleaved", "time_met": False,
                           "time_range": None, "time_range_coverage": None, "time_verdict": None,
                           "memory_ratio": pytest.approx(1.04), "memory_ratio_kind": "resident set",
                           "memory_met": True}
    assert t["s/bf16"]["time_met"] is True and t["s/bf16"]["memory_met"] is False


@pytest.mark.parametrize("rounds, verdict, interval, coverage", [
    ([1.01, 1.17, 1.08], "inconclusive", [1.01, 1.17], 0.75),  # a median under the target, a round above it
    ([1.00, 1.05, 1.09, 0.97, 1.10], "met", [0.97, 1.10], 1 - 2 / 32),
    ([1.11, 1.30, 1.20], "not met", [1.11, 1.30], 0.75),
    # 9 rounds: the 2nd smallest to the 2nd largest holds the median with probability 1 - 2 (1 + 9) / 2^9,
    # so one outlying round on each side does not decide
    ([1.25, 1.00, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 0.90], "met", [1.00, 1.06], 1 - 20 / 512),
    ([1.00, 1.02], None, None, None),  # two rounds: a range that holds the median half the time, no verdict
])
def test_the_time_verdict_reads_the_spread_of_the_rounds(rounds, verdict, interval, coverage):
    recs = bench.with_ratios([
        {"shape": "s", "batch": 2, "seq": 8, "method": m, "precision": "bf16", "status": "ok", "time_s": 1.0,
         "peak_mb": 100, "time_ratio_interleaved": sorted(rs)[len(rs) // 2], "round_ratios": rs}
        for m, rs in (("nonprivate", [1.0] * len(rounds)), ("ours_bk", rounds))])
    t = bench.targets(recs, ["s"])["ours_bk"]["s/bf16"]
    assert t["time_verdict"] == verdict and t["time_range"] == interval
    assert t["time_range_coverage"] == (None if coverage is None else pytest.approx(coverage))
    assert t["time_met"] is (sorted(rounds)[len(rounds) // 2] <= bench.TIME_TARGET)


def test_the_targets_read_the_tensor_peak_where_it_was_measured():
    """A CPU's live-tensor peak (one number per shape) decides the memory target over its resident set."""
    def rec(method, rss, tensors):
        return {"shape": "s", "batch": 2, "seq": 8, "method": method, "precision": "fp32", "status": "ok",
                "time_s": 1.0, "peak_mb": rss, "tensor_peak_mb": tensors, "device": "cpu"}

    recs = bench.with_ratios([rec("nonprivate", 100, 200), rec("ours_bk", 110, 204)])
    assert recs[1]["memory_ratio"] == pytest.approx(1.1) and recs[1]["tensor_memory_ratio"] == pytest.approx(1.02)
    t = bench.targets(recs, ["s"])["ours_bk"]["s/fp32"]
    assert t["memory_ratio_kind"] == "tensors" and t["memory_ratio"] == pytest.approx(1.02) and t["memory_met"]


def test_the_tensor_peak_counts_what_is_held_and_what_a_step_allocates():
    import torch

    held = torch.zeros(2**20)  # 4 MB alive when the step starts

    def step(parts):
        for n in parts:
            torch.ones(n).sum()  # freed at once: the peak is the largest, not the sum

    base = measure.tensor_peak_mb(lambda parts: None, [])
    assert measure.tensor_peak_mb(step, [2**20, 3 * 2**20]) - base == pytest.approx(12, abs=0.5)
    del held
    assert base - measure.tensor_peak_mb(lambda parts: None, []) == pytest.approx(4, abs=0.5)


def test_the_overhead_profile_accounts_for_the_extra_time():
    np_ = {"forward": 1.0, "backward": 2.0, "optimizer": 0.5}
    bk = {"forward": 1.1, "backward (engine, all)": 2.4, "backward: output gradients": 1.2, "norms": 0.3,
          "noise": 0.2, "optimizer": 0.5}
    p = measure.overhead_profile(np_, bk, np_time=3.5, bk_time=4.25)
    s = p["seconds"]
    assert s["forward"] == pytest.approx(0.1) and s["norms"] == 0.3 and s["noise"] == 0.2
    assert s["backward"] == pytest.approx(2.4 - 0.3 - 2.0) and s["optimizer"] == pytest.approx(0.0)
    assert sum(s.values()) == pytest.approx(p["extra_s"]) == pytest.approx(0.75)
    assert p["engine_backward_split_s"]["clipped_sum"] == pytest.approx(0.9)
    assert p["fraction_of_nonprivate_step"]["norms"] == pytest.approx(0.3 / 3.5)


def test_interleaved_profile_and_norm_strategies(tiny_shape):
    got = measure.measure_interleaved(workload.CPU_SHAPES[tiny_shape], ["ours_bk"], batch=2, seq=8, rounds=2,
                                    device="cpu", profile=True)
    assert set(got["ours_bk"]["profile"]) >= {"forward", "backward (engine, all)", "norms", "noise", "optimizer"}
    assert set(got["nonprivate"]["profile"]) == {"forward", "backward", "optimizer"}
    ns = measure.norm_strategies(workload.CPU_SHAPES[tiny_shape], batch=2, seq=8, device="cpu")
    assert ns["measured_best_s"] <= ns["auto_s"] + 1e-12 and ns["measured_best_s"] <= ns["ghost_only_s"] + 1e-12
    assert "transformer.h.0.attn.c_attn.weight" in ns["per_parameter"]
    held = ns["held_until_the_clipped_sum"]  # what book-keeping keeps until its clipped sum: both kinds
    assert held["layer_inputs_mb"] > 0 and held["output_gradients_and_other_mb"] > 0
    # the tied head alone: 2 x 8 tokens x 32 x 50,257 multiply-adds forward, twice that backward
    flops = ns["matmul_gflop"]
    assert flops["nonprivate_step"] >= 6 * 16 * 32 * 50257 / 1e9 and 0 < flops["norms"] < flops["nonprivate_step"]
    assert flops["norms_share"] == pytest.approx(flops["norms"] / flops["nonprivate_step"])


def test_matmul_flops_count_a_wide_gram_summed_in_slices(monkeypatch):
    import torch

    from privtune.dp import contributions

    factor = torch.randn(2, 8, 300, dtype=torch.bfloat16)
    whole = measure.matmul_flops(lambda: torch.bmm(factor, factor.transpose(1, 2)))
    assert whole == 2 * 2 * 8 * 8 * 300
    monkeypatch.setattr(contributions, "WIDE_BYTES", 1024)  # widened in slices: one bmm, then baddbmm_
    with contributions.exact_products():
        assert measure.matmul_flops(lambda: contributions._gram(factor)) == whole


def test_the_profile_line_puts_the_largest_share_first_and_the_norms_flops_beside_them():
    r = {"shape": "gpt2", "precision": "bf16", "method": "ours_bk",
         "profile": {"fraction_of_nonprivate_step": {"noise": 0.073, "norms": 0.076, "backward": -0.01},
                     "norm_strategies": {"matmul_gflop": {"norms_share": 0.051}}}}
    line = bench.profile_line(r)
    assert line.index("norms +7.6 (5.1 % of its matrix-product FLOPs)") < line.index("noise +7.3") \
        < line.index("backward -1.0")
    assert bench.profile_line({"shape": "gpt2", "method": "nonprivate"}) is None


def test_every_method_has_one_step_factory():
    from privtune.bench import steps

    assert steps.METHODS == tuple(steps.STEPS) and set(bench.INTERLEAVED) <= set(steps.STEPS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        steps.make_step("nope", None, 1)
