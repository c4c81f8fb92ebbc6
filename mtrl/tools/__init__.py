"""Command-line tools, each run as ``python -m mtrl.tools.<name>``.

* ``plot RUN_DIR [--out PNG]`` -- training curves from a run's ``metrics.jsonl``.
* ``memory_plan config=FILE [overrides]`` -- per-GPU memory estimate of a config, per component and phase.
* ``convert_config``, ``split_data`` -- see their module docstrings.
"""
