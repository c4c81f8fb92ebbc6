"""Rule-based rewards: load a user reward function (`function`) and score batches with it (`manager`).

Names are imported lazily (PEP 562) so that a reward actor, which only needs `worker` and `function`,
starts without importing torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "RewardError": "function",
    "RewardFunction": "function",
    "load_reward_function": "function",
    "RewardManager": "manager",
    "batch_to_samples": "manager",
    "reward_metrics": "aggregation",
    "token_level_scores": "aggregation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
