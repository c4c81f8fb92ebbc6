"""RL math, one module per concept (re-exported by `policy_optimization`), and the `optimization` config section (`config`)."""
