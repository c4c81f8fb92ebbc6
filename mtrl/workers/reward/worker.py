"""`RewardWorker`: the body of one Ray reward actor (see `manager`).

Kept apart from `manager` and free of torch imports, so a reward actor process starts quickly.
"""

from typing import Any, Dict, List, Tuple

from mtrl.workers.reward.function import Metrics, Scores, load_reward_function


class RewardWorker:
    """Loads the reward function from its resolved absolute `file.py:function` and scores chunks."""

    def __init__(self, file_spec: str, kwargs: Dict[str, Any], form: str):
        self.reward_fn = load_reward_function(file_spec, None, kwargs, form)

    def ready(self) -> bool:
        return True

    def score(self, samples: List[Dict[str, Any]], offset: int) -> Tuple[Scores, Metrics]:
        """(scores, metrics) of `samples`, which start at row `offset` of the batch (for error messages)."""
        return self.reward_fn(samples, offset)
