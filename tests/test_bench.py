"""The clipping benchmark on a tiny shape: it runs, records failures as results, and computes ratios."""
import pytest

from privtune.bench import clipping as bench


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.CPU_SHAPES, "tiny", dict(n_embd=32, n_layer=1, n_head=2))
    return "tiny"


@pytest.mark.parametrize("method", ["nonprivate", "ours_bk", "ours_ghost", "opacus_hooks", "opacus_ghost_untied"])
def test_each_method_runs_on_a_tiny_gpt2(tiny_shape, method):
    r = bench.measure_one(bench.CPU_SHAPES[tiny_shape], method, batch=2, seq=8, steps=1, device="cpu")
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
    got = bench.measure_interleaved(bench.CPU_SHAPES[tiny_shape], ["ours_bk", "opacus_ghost"], batch=2, seq=8,
                                    rounds=3, device="cpu")
    assert got["nonprivate"]["round_ratios"] == [1.0, 1.0, 1.0]
    r = got["ours_bk"]
    assert len(r["round_ratios"]) == 3 and r["time_ratio_interleaved"] == sorted(r["round_ratios"])[1] > 0
    assert "tying" in got["opacus_ghost"]["interleaved_error"]  # Opacus 1.6 refuses the tied model: recorded, not raised


def test_length_sorted_batches_benchmark_reports_its_token_bound(tmp_path, tiny_models):
    """bench_batches on a tiny model: both splits run the same logical batches; sorting never pads more."""
    from privtune.bench.batches import measure
    from privtune.io import write_jsonl

    words = ["good", "bad", "a long and rather winding sentence about a film that went on and on", "ok"]
    write_jsonl(tmp_path / "train.jsonl", [{"text_a": words[i % 4], "text_b": None, "label": i % 2}
                                           for i in range(64)])
    r = measure(tiny_models / "bert", tmp_path / "train.jsonl", batch=32, physical=8, tokens=128, rounds=1,
                prompt={"family": "similarity"})  # the byte tokenizer has no one-token label words
    assert r["padded_tokens_ratio"] >= 1.0 and r["logical_batch"] == 32
    assert set(r["examples_per_s"]) == {"padded", "length_sorted"} and min(r["examples_per_s"].values()) > 0
