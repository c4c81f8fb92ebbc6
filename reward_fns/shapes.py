"""Reward for the built-in coloured-shapes task (`mtrl.utils.shapes_task`): exact short-answer accuracy.

Use with `worker.reward.reward_fn_path: reward_fns/shapes.py`, optionally
`worker.reward.reward_fn_kwargs: {format_weight: 0.1}`.

reward = (1 - format_weight) * accuracy + format_weight * format, in [0, 1].

* The answer is read from the response as follows (first rule that applies):
  1. the last `<answer>...</answer>` block, if there is one;
  2. the words after "answer is" / "answer:" (for chatty models: "The answer is red.");
  3. otherwise the first word(s) of the response (as many words as the ground truth has).
* accuracy = 1.0 when the answer equals `ground_truth` after normalisation: lower case, punctuation
  removed, whitespace collapsed, number words mapped to digits ("two" == "2") and "color" spelled
  "colour"; else 0.0.
* format = 1.0 when the response is concise: just the answer (optionally followed by a full stop), or
  exactly one `<answer>...</answer>` block with nothing but whitespace around it; and the answer has
  at most max(`max_answer_words`, words in the ground truth) words. Else 0.0. It rewards answering
  tersely, which the task asks for ("Answer with one word.").

Metrics: `accuracy`, `format`.

This file is plain Python and does not import MTRL (see mtrl/workers/reward/function.py).
"""

import re
import string
from typing import Any, Dict, List, Tuple

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ONLY_ANSWER_BLOCK = re.compile(r"\s*<answer>((?:(?!</?answer>).)*)</answer>\s*", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)\s*(.+)", re.IGNORECASE | re.DOTALL)
_WORD = re.compile(r"[A-Za-z0-9]+")

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_SPELLINGS = {"color": "colour", "grey": "gray"}
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: Any) -> str:
    """Lower case, punctuation -> spaces, collapsed whitespace, number words -> digits, one spelling."""
    words = str(text).lower().translate(_PUNCTUATION).split()
    return " ".join(_SPELLINGS.get(w, _NUMBER_WORDS.get(w, w)) for w in words)


def _first_words(text: str, n: int) -> str:
    return " ".join(_WORD.findall(text)[:max(n, 1)])


def extract_answer(response: str, n_words: int = 1) -> str:
    """The answer part of `response` (see the module docstring for the rules); "" if there is none."""
    blocks = _ANSWER_BLOCK.findall(response)
    if blocks:
        return blocks[-1].strip()
    match = _ANSWER_IS.search(response)
    if match:
        return _first_words(match.group(1), n_words)
    return _first_words(response, n_words)


def format_score(response: str, max_answer_words: int = 1) -> float:
    """1.0 for a bare short answer ("red", "Red.") or one `<answer>` block holding one, else 0.0."""
    block = _ONLY_ANSWER_BLOCK.fullmatch(response)
    body = block.group(1) if block else response
    body = body.strip()
    if body.endswith("."):
        body = body[:-1]
    if not body or "<" in body or "\n" in body:
        return 0.0
    words = body.split()
    return 1.0 if len(words) <= max_answer_words and all(_WORD.fullmatch(w) for w in words) else 0.0


def reward_function(data_dict: Dict[str, Any], format_weight: float = 0.1,
                    max_answer_words: int = 1) -> Tuple[float, Dict[str, float]]:
    """(1 - format_weight) * accuracy + format_weight * format; metrics {"accuracy", "format"}."""
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    response = str(data_dict.get("response") or "")
    truth = normalize(data_dict.get("ground_truth", ""))
    n_words = max(1, len(truth.split()))
    answer = normalize(extract_answer(response, n_words))
    accuracy = 1.0 if truth and answer == truth else 0.0
    fmt = format_score(response, max(max_answer_words, n_words))
    return (1.0 - format_weight) * accuracy + format_weight * fmt, {"accuracy": accuracy, "format": fmt}


def batch_reward_function(data_dicts: List[Dict[str, Any]], **kwargs) -> List[Tuple[float, Dict[str, float]]]:
    """The batch form (one `(reward, metrics)` per data_dict)."""
    return [reward_function(d, **kwargs) for d in data_dicts]
