"""Data-parallel training (train.world_size): two gloo processes on the CPU end where one process
does, to float32 rounding, with the same σ and ε; every rank resumes from the checkpoint; with
secure noise the ranks still agree; a failure names the rank and stops the others."""
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from privtune.training import checkpoint

from privtune.training import distributed
from privtune.dp import sampling
from privtune.io import read_json, write_jsonl
from privtune.dp.rng import secret_root
from privtune.training.loop import DIAGNOSTICS, RunSettings, run

TEXTS = ["a great film", "dull and slow", "wonderful acting", "a mess", "loved it", "boring", "superb", "awful"]
SST = [{"text_a": t, "text_b": None, "label": i % 2} for i, t in enumerate(TEXTS * 8)]  # 64 examples
STEPS = 5
# float32 rounding of a sum taken in another order, carried through a few optimizer steps
PARAMS_TOL = dict(rtol=1e-5, atol=1e-7)  # observed: at most 4e-9 apart


@pytest.fixture(scope="module", autouse=True)
def collective_timeout():
    """A lost peer fails the test in two minutes instead of hanging the suite (children inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(distributed.TIMEOUT_ENV, "120")
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    """A dropout-free copy of the tiny BERT (dropout masks would differ with the batch split) and data."""
    root = tmp_path_factory.mktemp("dist")
    model = root / "bert-nodrop"
    shutil.copytree(tiny_models / "bert", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    write_jsonl(root / "train.jsonl", SST)
    return root, model


CASES = {  # name: settings (world_size aside)
    # Poisson batches of ~8, ~4 per rank in physical batches of 3: accumulation on each rank
    "dp": dict(epsilon=8.0, delta=1e-3, batch_size=8, physical_batch_size=3, diagnostics=True),
    # batches of ~2: a rank's shard (even the whole batch) is often empty; masks from the noise generator
    "dp_ct_f": dict(epsilon=8.0, delta=1e-3, batch_size=2, physical_batch_size=3, child="ct_f", p_f=0.5,
                    diagnostics=True),
    # SGD: Adam's m/√v would turn rounding-level gradients (an attention key bias) into ±lr steps
    "nonprivate": dict(batch_size=8, physical_batch_size=3, optimizer="sgd", lr=0.05),
}


def _settings(name: str, world_size: int) -> RunSettings:
    return RunSettings(**{"kind": "classification", "steps": STEPS, "lr": 1e-3, "max_length": 32,
                          "checkpoint_every": 2, "world_size": world_size, **CASES[name]})


@pytest.fixture(scope="module")
def trained(setup):
    """``trained(name, world_size)``: that run's folder (each run once per module)."""
    root, model = setup
    done = {}

    def get(name: str, world_size: int):
        if (name, world_size) not in done:
            out = root / f"{name}-w{world_size}"
            done[name, world_size] = (out, run(_settings(name, world_size), model, root / "train.jsonl", out,
                                               progress=False))
        return done[name, world_size]

    return get


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


def test_world_size_below_one_is_refused():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=r"train\.world_size must be an integer >= 1"):
            RunSettings(kind="classification", world_size=bad)


@pytest.mark.slow  # two gloo processes per case, against one: about a minute in all
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_end_where_one_does(trained, name):
    one, res1 = trained(name, 1)
    two, res2 = trained(name, 2)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], **PARAMS_TOL, msg=lambda m, k=k: f"{k}: {m}")
    p1, p2 = read_json(one / "privacy.json"), read_json(two / "privacy.json")
    assert p2["noise_multiplier"] == p1["noise_multiplier"] and p2["epsilon"] == p1["epsilon"]
    if CASES[name].get("epsilon"):
        assert p1["noise_multiplier"] > 0 and p1["epsilon"] <= 8.0
    private = bool(CASES[name].get("epsilon"))
    if private:  # batch sizes and losses are data statistics: only in the diagnostics file asked for
        d1, d2 = read_json(one / DIAGNOSTICS), read_json(two / DIAGNOSTICS)
        log1, log2 = d1["steps"], d2["steps"]
        assert d2["noise_to_signal"] == pytest.approx(d1["noise_to_signal"], rel=1e-5)
    else:
        log1, log2 = read_json(one / "train_log.json"), read_json(two / "train_log.json")
    assert [e["batch"] for e in log1] == [e["batch"] for e in log2]
    np.testing.assert_allclose([e["loss"] for e in log2], [e["loss"] for e in log1], rtol=1e-6)
    m1, m2 = read_json(one / "train_metrics.json"), read_json(two / "train_metrics.json")
    assert (m1["world_size"], m2["world_size"]) == (1, 2) and m2["device"] == "cpu"
    assert res2["train"]["world_size"] == 2 and res2["privacy"]["epsilon"] == res1["privacy"]["epsilon"]
    assert not (two / "checkpoint").exists()
    assert sorted(p.name for p in two.iterdir()) == sorted(["model", "privacy.json", "train_log.json",
                                                             "train_metrics.json", *([DIAGNOSTICS] * private)])
    before = load_file(one.parent / "bert-nodrop" / "model.safetensors")  # training moved the parameters
    moved = [float((w1[k] - before[k]).abs().max()) for k in w1 if k in before]  # tiny BERT: saved as a masked LM
    assert moved and max(moved) > 100 * PARAMS_TOL["atol"]


def test_empty_shards_occur_in_the_ct_f_case():
    s = _settings("dp_ct_f", 2)
    batches = [idx for _, idx in sampling.logical_batches(len(SST), s.batch_size, STEPS, s.seed)]
    assert any(len(distributed.shard(idx, 1, 2)) == 0 for idx in batches)


class Crash(Exception):
    pass


@pytest.mark.slow
def test_every_rank_resumes_from_the_checkpoint(trained, setup, monkeypatch):
    """A checkpoint (made here by a one-process run stopped after step 4, relabelled for two
    processes) is loaded by both ranks: the run ends where the uninterrupted ones do."""
    root, model = setup
    out = root / "resumed"
    real = checkpoint.save

    def save_then_crash(folder, state, fp, **kw):
        real(folder, state, fp, **kw)
        if state["step"] == 4:
            raise Crash("stopped after the checkpoint at step 4")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", save_then_crash)
        with pytest.raises(Crash):
            run(_settings("dp", 1), model, root / "train.jsonl", out, progress=False)
    two = _settings("dp", 2)
    state = torch.load(out / "checkpoint" / checkpoint.STATE, weights_only=False)
    checkpoint.save(out / "checkpoint", state, checkpoint.fingerprint(asdict(two), root / "train.jsonl", model, None))

    res = run(two, model, root / "train.jsonl", out, progress=False)
    assert res["train"]["segments"] == [{"start": 0, "stop": 4}, {"start": 4, "stop": STEPS}]
    assert res["train"]["world_size"] == 2 and not (out / "checkpoint").exists()
    w = _weights(out)
    for ref in (trained("dp", 1)[0], trained("dp", 2)[0]):
        wr = _weights(ref)
        for k in wr:
            torch.testing.assert_close(w[k], wr[k], **PARAMS_TOL)
        np.testing.assert_allclose([e["loss"] for e in read_json(out / DIAGNOSTICS)["steps"]],  # asked for
                                   [e["loss"] for e in read_json(ref / DIAGNOSTICS)["steps"]], rtol=1e-6)
        assert res["privacy"]["epsilon"] == read_json(ref / "privacy.json")["epsilon"]


def test_secure_noise_is_drawn_once_for_all_ranks(setup):
    """Rank 0's OS-drawn seed is broadcast: the run passes the end-of-run check that the replicas
    are identical (noise drawn per rank would fail it: 'the ranks' parameters diverged')."""
    root, model = setup
    s = RunSettings(**{**asdict(_settings("dp", 2)), "steps": 2, "secure_noise": True})
    res = run(s, model, root / "train.jsonl", root / "secure", progress=False)
    assert res["privacy"]["noise_rng"].startswith("keyed by 128 bits from the operating system")
    assert res["train"]["world_size"] == 2


# -- the helpers, in two gloo processes -------------------------------------------------------


def _helpers_then_fail_on_rank_1(out):
    """Each rank: agree on a secure seed, sum gradients (missing ones count as zeros) and numbers;
    rank 0 writes what it got; then rank 1 fails while rank 0 waits for it in a collective."""
    rank = dist.get_rank()
    seed = distributed.broadcast_seed(secret_root(0, secure=True), torch.device("cpu"))
    seeds = [None, None]
    dist.all_gather_object(seeds, seed)
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), float(rank + 1))  # both ranks
    if rank == 1:
        b.grad = torch.ones(3)  # rank 1 only; c: neither
    distributed.all_reduce_grads([a, b, c])
    total = distributed.all_reduce_sum([0.5 * (rank + 1), rank + 1], torch.device("cpu"))
    if distributed.is_main():
        (out / "helpers.json").write_text(json.dumps({
            "seeds": seeds, "a": a.grad.tolist(), "b": b.grad.tolist(), "c_none": c.grad is None, "total": total}))
    dist.barrier()
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits here for a peer that has died: launch must stop it


def test_helpers_and_a_failing_rank_in_two_processes(tmp_path):
    with pytest.raises(distributed.RankError, match=r"world_size = 2: rank 1 failed: ValueError: boom on rank 1") as e:
        distributed.launch(_helpers_then_fail_on_rank_1, 2, (tmp_path,))
    assert e.value.rank == 1
    got = json.loads((tmp_path / "helpers.json").read_text())
    assert got["seeds"][0] == got["seeds"][1]  # secure_noise: rank 0's 128-bit root, on every rank
    assert got["seeds"][0].bit_length() > 64  # all 128 bits cross (below 2**64 with probability 2**-64)
    assert got["a"] == [3.0] * 3 and got["b"] == [1.0] * 3 and got["c_none"]
    assert got["total"] == [1.5, 3.0]
