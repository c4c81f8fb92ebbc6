"""Text metrics usable as rewards or validation metrics (reward_fns/text_metrics.py): BLEU-4 (sacrebleu),
ROUGE-L (rouge-score), distinct-n."""

from pathlib import Path

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from mtrl.workers.reward.function import load_reward_function  # noqa: E402

REWARD_FILE = Path(__file__).resolve().parents[1] / "reward_fns" / "text_metrics.py"


@pytest.fixture(scope="module")
def tm():
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_metrics", REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bleu4(tm):
    assert tm.bleu4("the cat sat on the mat today", ["the cat sat on the mat today"]) == pytest.approx(1.0)
    assert tm.bleu4("completely different words here", ["the cat sat on the mat"]) < 0.05
    import sacrebleu

    hyp, ref = "the cat is on the mat", "there is a cat on the mat"
    assert tm.bleu4(hyp, [ref]) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100)
    assert tm.bleu4("x", []) == 0.0


def test_rouge_l(tm):
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 1, R = 0.5, F = 2/3.
    assert tm.rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert tm.rouge_l("a b", ["x y", "a b"]) == pytest.approx(1.0)  # best reference


def test_distinct_n(tm):
    assert tm.distinct_n("a b a b", 1) == pytest.approx(2 / 4)
    assert tm.distinct_n("a b a b", 2) == pytest.approx(2 / 3)   # ab, ba, ab
    assert tm.distinct_n("a", 2) == 0.0
    assert tm.corpus_distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)


def test_as_a_reward_function(tm):
    fn = load_reward_function(f"{REWARD_FILE}", None, {"metric": "rouge_l"})
    scores, metrics = fn([{"prompt": "p", "response": "the cat sat", "ground_truth": "the cat sat on the mat",
                           "images": []}], 0)
    assert scores[0] == pytest.approx(2 / 3)
    assert set(metrics) == {"bleu", "rouge_l", "distinct_1", "distinct_2"}
    mixed, _ = tm.reward_function({"response": "a b", "ground_truth": "a b"}, weights={"rouge_l": 0.5, "distinct_1": 0.5})
    assert mixed == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown text metric"):
        tm.reward_function({"response": "a", "ground_truth": "a"}, metric="meteor")
