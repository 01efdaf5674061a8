"""Tests for privtune.metrics: hand-computed values wherever feasible."""
import math
import os
import shutil

import pytest

from privtune import metrics
from privtune.metrics import MissingJavaError, classification_metrics, generation_metrics

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")
ALL = ("bleu", "nist", "meteor", "rouge_l", "cider")


def _no_java(monkeypatch):
    monkeypatch.setattr("privtune.metrics.generation.shutil.which", lambda *a, **k: None)


def _java_children():
    """Live child processes of this process running java (Linux /proc only)."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and "java" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(cmd)
    return found


# ------------------------------------------------------------------ classification


def test_accuracy_three_of_four():
    out = classification_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1])
    assert out == {"accuracy": 0.75}
    assert type(out["accuracy"]) is float
    assert classification_metrics("mnli-mm", [0, 2, 1], [0, 2, 2]) == pytest.approx({"accuracy": 2 / 3})


def test_f1_positive_class_by_hand():
    preds = [1, 1, 1, 0, 0, 1]
    labels = [1, 0, 0, 1, 0, 1]
    # TP=2 (0, 5), FP=2 (1, 2), FN=1 (3), TN=1 (4): P=1/2, R=2/3
    p, r = 2 / 4, 2 / 3
    for task in ("mrpc", "qqp"):
        out = classification_metrics(task, preds, labels)
        assert set(out) == {"accuracy", "f1"}
        assert out["f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-12)  # = 4/7
        assert out["f1"] == pytest.approx(4 / 7, abs=1e-12)
        assert out["accuracy"] == pytest.approx(3 / 6, abs=1e-12)


def test_mcc_two_by_two_by_hand():
    preds = [1, 1, 1, 0, 0, 1, 0]
    labels = [1, 0, 1, 1, 0, 1, 0]
    tp, fp, fn, tn = 3, 1, 1, 2
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out = classification_metrics("cola", preds, labels)
    assert set(out) == {"mcc", "accuracy"}
    assert out["mcc"] == pytest.approx(mcc, abs=1e-12)  # = 5/12
    assert out["mcc"] == pytest.approx(5 / 12, abs=1e-12)
    assert out["accuracy"] == pytest.approx(5 / 7, abs=1e-12)


def test_pearson_spearman_by_hand():
    preds = [1.0, 2.0, 3.0, 4.0]
    labels = [1.0, 3.0, 2.0, 10.0]
    # deviations: preds (-1.5, -.5, .5, 1.5), labels (-3, -1, -2, 6): cov 13, var 5 and 50
    # ranks of labels (1, 3, 2, 4): spearman = 1 - 6 * (0+1+1+0) / (4 * 15) = 0.8
    out = classification_metrics("stsb", preds, labels)
    assert set(out) == {"pearson", "spearman"}
    assert out["pearson"] == pytest.approx(13 / math.sqrt(5 * 50), abs=1e-12)
    assert out["spearman"] == pytest.approx(0.8, abs=1e-12)


def test_classification_input_errors():
    with pytest.raises(ValueError, match="unknown task"):
        classification_metrics("squad", [1], [1])
    with pytest.raises(ValueError, match="length"):
        classification_metrics("sst2", [1, 0], [1])


# ------------------------------------------------------------------ BLEU


def test_bleu_identical_is_100_and_lowercased():
    hyps = ["the cat sat on the mat", "there is a pub near the river"]
    assert generation_metrics(hyps, [[h] for h in hyps], metrics=("bleu",))["bleu"] == pytest.approx(100.0)
    # mteval-v13a (and so the E2E script) lower-cases by default
    out = generation_metrics(["The Cat sat on the MAT"], [["the cat sat on the mat"]], metrics=("bleu",))
    assert out["bleu"] == pytest.approx(100.0)


def _bleu_by_hand(precisions, hyp_len, ref_len):
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(sum(math.log(p) for p in precisions) / 4)


def test_bleu_hand_computed():
    # hyp 7 tokens vs ref 6: 1-grams the,cat,sat,on,mat (the clipped to 1) = 5/7;
    # 2-grams the-cat,cat-sat,sat-on = 3/6; 3-grams 2/5; 4-grams "the cat sat on" 1/4; BP = 1
    out = generation_metrics(["the cat sat on the mat today"], [["the cat sat on a mat"]], metrics=("bleu",))
    assert out["bleu"] == pytest.approx(_bleu_by_hand([5 / 7, 3 / 6, 2 / 5, 1 / 4], 7, 6), abs=1e-6)
    # shorter hypothesis: precisions 5/5, 3/4, 2/3, 1/2 and BP = exp(1 - 6/5)
    out = generation_metrics(["the cat sat on mat"], [["the cat sat on the mat"]], metrics=("bleu",))
    assert out["bleu"] == pytest.approx(_bleu_by_hand([1, 3 / 4, 2 / 3, 1 / 2], 5, 6), abs=1e-6)


def test_bleu_multi_reference_helps():
    hyps = ["the cat sat on the mat", "a dog ran in the park"]
    refs = [["a cat was on the mat"], ["the dog is running"]]
    base = generation_metrics(hyps, refs, metrics=("bleu",))["bleu"]
    more = generation_metrics(hyps, [refs[0], refs[1] + ["a dog ran in the park"]], metrics=("bleu",))["bleu"]
    assert more > base


def test_bleu_ragged_references_by_hand():
    # segment 1 has two references, segment 2 one. Every hypothesis n-gram matches,
    # so BLEU = 100 * BP with closest reference lengths 6 and 3 against 7 hypothesis
    # tokens. Padding the missing reference with "" would make 0 the closest length
    # for "cat" and give BP = 1.
    hyps = ["the cat sat on the mat", "cat"]
    refs = [["a dog ran", "the cat sat on the mat"], ["the big cat"]]
    out = generation_metrics(hyps, refs, metrics=("bleu",))["bleu"]
    assert out == pytest.approx(100 * math.exp(1 - 9 / 7), abs=1e-6)
    # the order of the ragged lists does not matter
    refs2 = [["the big cat"], ["a dog ran", "the cat sat on the mat"]]
    assert generation_metrics(hyps[::-1], refs2, metrics=("bleu",))["bleu"] == pytest.approx(out, abs=1e-9)


# ------------------------------------------------------------------ NIST


def test_nist_identical_beats_partial():
    refs = [["the eagle is a pub in the city centre"], ["a cheap restaurant near the river"]]
    same = generation_metrics([r[0] for r in refs], refs, metrics=("nist",))["nist"]
    part = generation_metrics(["the eagle is a shop", "a restaurant by the sea"], refs, metrics=("nist",))["nist"]
    assert same > part > 0


def test_nist_hand_computed():
    # ref "a b d": info(a) = info(b) = log2(3 words / 1); info("a b") = log2(1/1) = 0.
    # hyp "a b c" hits a, b, "a b": NIST = (2 log2 3) / 3 unigrams, length ratio 1.
    out = generation_metrics(["a b c"], [["a b d"]], metrics=("nist",))["nist"]
    assert out == pytest.approx(2 * math.log2(3) / 3, abs=1e-12)
    # hyp "a b" vs ref "a b c d": unigram info 2 each -> 2 * 2 / 2 = 2; ratio 1/2
    beta = -math.log(0.5) / math.log(1.5) ** 2
    out = generation_metrics(["a b"], [["a b c d"]], metrics=("nist",))["nist"]
    assert out == pytest.approx(2 * math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)
    # mteval clips against all references at once: hyp "a b", refs "a x", "b y":
    # both unigrams hit with info log2(4/1) = 2 -> 4 / 2 = 2 (best single reference: 1)
    out = generation_metrics(["a b"], [["a x", "b y"]], metrics=("nist",))["nist"]
    assert out == pytest.approx(2.0, abs=1e-12)


def test_nist_matches_nltk_on_single_reference_corpus():
    from nltk.translate.nist_score import corpus_nist

    hyps = ["the eagle is a pub in the city centre", "there is a cheap family restaurant by the river",
            "blue spice is a coffee shop near the mall"]
    refs = [["the eagle pub is in the city centre near the bridge"],
            ["a cheap restaurant for families is by the river"],
            ["blue spice coffee shop is close to the mall"]]
    ours = generation_metrics(hyps, refs, metrics=("nist",))["nist"]
    theirs = corpus_nist([[r[0].split()] for r in refs], [h.split() for h in hyps], n=5)
    assert ours == pytest.approx(theirs, abs=1e-9)


# ------------------------------------------------------------------ ROUGE-L


def _rouge_f(p, r, beta):
    return (1 + beta**2) * p * r / (r + beta**2 * p)


@requires_java
def test_rouge_l_hand_computed_coco():
    # PTB tokenisation lower-cases and drops "."; LCS(the cat sat on the mat,
    # the cat was on the mat today) = "the cat on the mat" = 5; P = 5/6, R = 5/7
    out = generation_metrics(["The cat sat on the mat."], [["the cat was on the mat today"]],
                             metrics=("rouge_l",))
    assert set(out) == {"rouge_l"}
    assert out["rouge_l"] == pytest.approx(100 * _rouge_f(5 / 6, 5 / 7, 1.2), abs=1e-9)
    # several references: COCO's Rouge takes max P and max R separately
    # ref1 "the cat": LCS 2 -> P 2/6, R 1; ref2 as above -> P 5/6, R 5/7
    out = generation_metrics(["the cat sat on the mat"], [["the cat", "the cat was on the mat today"]],
                             metrics=("rouge_l",))
    assert out["rouge_l"] == pytest.approx(100 * _rouge_f(5 / 6, 1.0, 1.2), abs=1e-9)


# ------------------------------------------------------------------ METEOR / CIDEr (Java)

IDENT = ["the eagle is a pub in the city centre", "a cheap family friendly restaurant near the river",
         "blue spice is a coffee shop rated five out of five"]
UNRELATED = ["my dog likes long walks on sunny days", "quantum computers factor large numbers quickly",
             "she plays violin every tuesday evening"]


@pytest.fixture(scope="module")
def java_scores():
    if shutil.which("java") is None:
        pytest.skip("no java on PATH")
    refs = [[s] for s in IDENT]
    return {"same": generation_metrics(IDENT, refs), "other": generation_metrics(UNRELATED, refs),
            "children": _java_children()}


def test_meteor_cider_identical_vs_unrelated(java_scores):
    same, other = java_scores["same"], java_scores["other"]
    assert list(same) == list(ALL)
    assert all(math.isfinite(v) for v in [*same.values(), *other.values()])
    assert same["meteor"] > 95 and same["meteor"] <= 100
    assert other["meteor"] < 50 and same["meteor"] > other["meteor"]
    # each identical pair has cosine similarity 1 for all n-gram orders: 10 x 1 per pair
    assert same["cider"] == pytest.approx(10.0, abs=1e-9)
    assert same["cider"] > other["cider"] >= 0
    assert same["rouge_l"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    assert same["nist"] > other["nist"]


def test_meteor_jvm_is_shut_down(java_scores):
    assert java_scores["children"] == []


@requires_java
def test_empty_hypothesis_does_not_crash():
    refs = [[IDENT[0], "the eagle pub is in the centre"], [IDENT[1]], [IDENT[2]]]
    out = generation_metrics([IDENT[0], "", "..."], refs)
    assert list(out) == list(ALL) and all(math.isfinite(v) for v in out.values())
    assert 0 < out["meteor"] < 100 and 0 < out["bleu"] < 100
    empty = generation_metrics(["", "", ""], refs)
    assert empty == pytest.approx({m: 0.0 for m in ALL})


# ------------------------------------------------------------------ no Java


def test_missing_java_raises_helpful_error(monkeypatch):
    _no_java(monkeypatch)
    for requested in (ALL, ("meteor",), ("cider", "bleu")):
        with pytest.raises(MissingJavaError) as exc:
            generation_metrics(["a b c"], [["a b c"]], metrics=requested)
        msg = str(exc.value)
        assert "default-jre" in msg and "pycocoevalcap" in msg and "openjdk" in msg
        assert "bleu" in msg and "nist" in msg and "rouge_l" in msg
    assert issubclass(MissingJavaError, RuntimeError)


def test_rouge_l_fallback_without_java(monkeypatch):
    _no_java(monkeypatch)
    with pytest.warns(UserWarning, match="rouge-score"):
        out = generation_metrics(["the cat sat on the mat", "hello world"],
                                 [["the cat was on the mat today"], ["goodbye", "hello world"]],
                                 metrics=("bleu", "nist", "rouge_l"))
    assert set(out) == {"bleu", "nist", "rouge_l"}
    # rouge-score: F-measure with beta = 1; segment 2 matches its second reference exactly
    assert out["rouge_l"] == pytest.approx(100 * (_rouge_f(5 / 6, 5 / 7, 1.0) + 1.0) / 2, abs=1e-9)
    assert out["bleu"] > 0 and out["nist"] > 0


# ------------------------------------------------------------------ input checks


def test_generation_input_errors():
    with pytest.raises(ValueError, match="reference lists"):
        generation_metrics(["a", "b"], [["a"]], metrics=("bleu",))
    with pytest.raises(ValueError, match="no reference"):
        generation_metrics(["a"], [[]], metrics=("bleu",))
    with pytest.raises(ValueError, match="empty reference"):
        generation_metrics(["a"], [["a", " "]], metrics=("bleu",))
    with pytest.raises(ValueError, match="unknown metric"):
        generation_metrics(["a"], [["a"]], metrics=("bleurt",))


def test_ter_by_hand_lower_is_better_and_ragged_references():
    """TER = edits / reference words: three insertions against six words is 50; identical is 0; a hypothesis
    scores against its closest reference, and a missing reference (ragged lists) is skipped, not empty."""
    from privtune.metrics.generation import generation_metrics

    assert generation_metrics(["the cat sat"], [["the cat sat on the mat"]], ["ter"])["ter"] == pytest.approx(50.0)
    assert generation_metrics(["a b c"], [["a b c"]], ["ter"])["ter"] == 0.0
    ragged = generation_metrics(["a b", "c d"], [["a b"], ["c d", "c e"]], ["ter"])["ter"]
    assert ragged == 0.0
    worse = generation_metrics(["x y", "c d"], [["a b"], ["c d", "c e"]], ["ter"])["ter"]
    assert worse > ragged
