"""RL math (`policy_optimization`) and the `optimization` config section (`config`)."""
