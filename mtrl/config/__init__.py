"""Config dataclasses that every layer may read (the bottom of the dependency order).

`worker.py`: the `worker` section (actor, critic, reference, rollout, reward) and `WorkerRunConfig`, the
only config a worker process receives. The `optimization` section is `mtrl/optimization/config.py`; the
root config that holds every section, with loading and validation, is `mtrl/training/training_config.py`.
"""
