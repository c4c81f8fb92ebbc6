"""Text-overlap metrics as a reward (or for validation): BLEU-4, ROUGE-L, distinct-n.

Use with `worker.reward.reward_fn_path: reward_fns/text_metrics.py`, choosing the reward with
`worker.reward.reward_fn_kwargs: {metric: rouge_l}` (bleu | rouge_l | distinct_1 | distinct_2, or a
weighted mix `weights: {bleu: 0.5, rouge_l: 0.5}`). Every metric is logged whatever the reward is
(`reward/bleu`, `reward/rouge_l`, `reward/distinct_1`, `reward/distinct_2`), so validation shows them all.

* BLEU-4: sacrebleu's sentence BLEU (smoothing `exp`, its default; 13a tokenizer), divided by 100 -> [0, 1].
  The reference is `ground_truth` (a string, or a list of references).
* ROUGE-L: the F-measure of Google's `rouge-score` (`RougeScorer(["rougeL"], use_stemmer=True)`); several
  references -> the best one.
* distinct-n (Li et al. 2016): unique n-grams / all n-grams of the response (whitespace tokens, lower
  case); 0 for a response shorter than n. Needs no reference.

Maintained libraries: `pip install sacrebleu rouge-score` (or `pip install mtrl[metrics]`); a clear error
names them when missing. The file does not import MTRL (see mtrl/workers/reward/function.py).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

METRICS = ("bleu", "rouge_l", "distinct_1", "distinct_2")

_rouge_scorer = None


def _references(ground_truth: Any) -> List[str]:
    if isinstance(ground_truth, (list, tuple)):
        return [str(g) for g in ground_truth]
    return [str(ground_truth)] if ground_truth not in (None, "") else []


def bleu4(hypothesis: str, references: Sequence[str]) -> float:
    """Sentence BLEU-4 in [0, 1] (sacrebleu, exp smoothing); 0 without references."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU needs sacrebleu: pip install sacrebleu") from None
    if not references:
        return 0.0
    return float(sacrebleu.sentence_bleu(hypothesis, list(references)).score) / 100.0


def rouge_l(hypothesis: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1] (rouge-score, stemming); the best over several references."""
    global _rouge_scorer
    if _rouge_scorer is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ImportError("ROUGE needs rouge-score: pip install rouge-score") from None
        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not references:
        return 0.0
    return max(float(_rouge_scorer.score(ref, hypothesis)["rougeL"].fmeasure) for ref in references)


def distinct_n(text: str, n: int) -> float:
    """Unique n-grams / n-grams of `text` (lower-cased whitespace tokens); 0 when there is no n-gram."""
    tokens = str(text).lower().split()
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n over a whole set of responses (unique n-grams of all / all n-grams)."""
    grams = []
    for text in texts:
        tokens = str(text).lower().split()
        grams.extend(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def all_metrics(response: str, ground_truth: Any) -> Dict[str, float]:
    refs = _references(ground_truth)
    return {"bleu": bleu4(response, refs), "rouge_l": rouge_l(response, refs),
            "distinct_1": distinct_n(response, 1), "distinct_2": distinct_n(response, 2)}


def reward_function(data_dict: Dict[str, Any], metric: str = "rouge_l",
                    weights: Optional[Dict[str, float]] = None) -> Tuple[float, Dict[str, float]]:
    """The chosen metric (or the weighted sum of `weights`) as the reward; every metric in the metrics."""
    chosen = dict(weights) if weights else {metric: 1.0}
    unknown = sorted(set(chosen) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown text metric(s) {unknown}; known: {list(METRICS)}")
    metrics = all_metrics(str(data_dict.get("response") or ""), data_dict.get("ground_truth", ""))
    return float(sum(w * metrics[m] for m, w in chosen.items())), metrics
