"""`RewardWorker`: the body of one Ray reward actor (see `manager`).

Kept apart from `manager` and free of torch imports, so a reward actor process starts quickly.
"""

from typing import Any, Dict, List, Optional, Tuple

from mtrl.workers.reward.function import Errors, Metrics, Scores, load_reward_function


class RewardWorker:
    """Loads the reward function from its resolved absolute `file.py:function` and scores chunks."""

    def __init__(self, file_spec: str, kwargs: Dict[str, Any], form: str, on_error: str):
        self.reward_fn = load_reward_function(file_spec, None, kwargs, form)
        self.on_error = on_error

    def ready(self) -> bool:
        return True

    def score(self, samples: List[Dict[str, Any]], offset: int,
              uids: Optional[List[str]]) -> Tuple[Scores, Metrics, Errors]:
        """(scores, metrics, errors) of `samples`, which start at row `offset` of the batch (for messages)."""
        return self.reward_fn.score(samples, offset, self.on_error, uids)
