"""Format + accuracy reward for `<think>...</think><answer>...</answer>` responses (R1 / EasyR1 style).

Use with `worker.reward.reward_fn_path: reward_fns/format_accuracy.py`, optionally
`worker.reward.reward_fn_kwargs: {format_weight: 0.1}`.

reward = (1 - format_weight) * accuracy + format_weight * format

* format = 1.0 when the whole response is one `<think>...</think>` block followed by one
  `<answer>...</answer>` block (whitespace around them allowed), else 0.0.
* accuracy = 1.0 when the answer matches `ground_truth` (see `math_answer.answers_match`: exact text
  after normalisation, numeric equality, or element-wise for tuples; so it also works for short
  free-text VQA answers). The answer is read from the `<answer>` block when there is one (its last
  `\\boxed{}` if any, else the whole block); without an `<answer>` block, from the whole response as in
  `math_answer.extract_answer`, so a correct but badly formatted response still earns accuracy.

Metrics: `format`, `accuracy`.
"""

import re
from typing import Any, Dict, Tuple

# MTRL's reward loader puts this file's folder on sys.path while importing it, so the sibling
# module is found; copy math_answer.py along if you copy this file elsewhere.
from math_answer import answers_match, extract_answer, last_boxed

_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_score(response: str) -> float:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (one of each, nothing else), else 0.0."""
    return 1.0 if _FORMAT.fullmatch(response) else 0.0


def answer_text(response: str) -> Any:
    """The answer to grade: from the last `<answer>` block when present, else from the whole response."""
    blocks = _ANSWER.findall(response)
    if blocks:
        block = blocks[-1]
        boxed = last_boxed(block)
        return boxed if boxed is not None else block.strip()
    return extract_answer(response)


def reward_function(data_dict: Dict[str, Any], format_weight: float = 0.1) -> Tuple[float, Dict[str, float]]:
    """(1 - format_weight) * accuracy + format_weight * format."""
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    response = data_dict["response"]
    fmt = format_score(response)
    accuracy = 1.0 if answers_match(answer_text(response), data_dict.get("ground_truth", "")) else 0.0
    return (1.0 - format_weight) * accuracy + format_weight * fmt, {"format": fmt, "accuracy": accuracy}
