"""`RewardManager`: score a `DataBatch` with the configured reward function, in Ray actors or in-process.

Where it runs
  * Ray path (Ray is initialised, or `use_ray=True`): `worker.reward.num_cpus` actors, each reserving
    one CPU, each holding its own copy of the reward function. One actor with `num_cpus` CPUs would
    not help: a Python reward function runs on one core per process (the GIL), so N single-CPU
    processes are what actually use N cores. The batch is cut into contiguous chunks, one per actor,
    scored concurrently and put back together in order. Scoring must finish within
    `worker.reward.timeout_s` (actor start-up has its own limit, ACTOR_START_TIMEOUT_S), otherwise
    the actors are killed (a hung function cannot be stopped any other way) and a `RewardError` is
    raised; they are started again on the next call.
  * Local path (Ray not initialised, or `use_ray=False`): the function runs in this process; used by
    unit tests and tools. `timeout_s` is not enforced there (a running Python call cannot be stopped).

Both paths give identical results: the same function sees the same samples, in the same order
(batch-form functions see one chunk per actor on the Ray path, the whole batch locally).

The reward file is also imported once in the driver when the manager is built, so a missing file,
a syntax error, a missing function or bad `reward_fn_kwargs` fail at start-up with a clear message
instead of inside an actor. (A file with import-time side effects therefore runs them once more.)

Inputs read from the batch (docs/DATA_LAYOUT.md): non_tensors `raw_prompt`, `response_text`,
`ground_truth` (optional, default ""), `images` (optional, default []); `response_length` (EasyR1's key)
counts the tensor `response_mask` (None without it).
"""

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mtrl.config.worker import RewardConfig
from mtrl.protocol import DataBatch
from mtrl.workers.reward.function import (FUNCTION_FORMS, Metrics, RewardError, RewardFunction, Scores,
                                          load_reward_function)
from mtrl.workers.reward.worker import RewardWorker

REQUIRED_FIELDS = ("raw_prompt", "response_text")
# Starting actors (new processes, maybe waiting for CPUs that killed actors are still releasing)
# is not the reward function's fault, so it gets its own, more generous limit than timeout_s.
ACTOR_START_TIMEOUT_S = 120.0


def batch_to_samples(batch: DataBatch) -> List[Dict[str, Any]]:
    """The reward functions' `data_dict`s (prompt, response, response_length, ground_truth, images), one per row."""
    missing = [k for k in REQUIRED_FIELDS if k not in batch.non_tensors]
    if missing:
        raise RewardError(f"Cannot compute rewards: the batch has no non-tensor field(s) {missing} "
                          f"(it has {sorted(batch.non_tensors)}).")
    n = len(batch)
    prompts, responses = batch.non_tensors["raw_prompt"], batch.non_tensors["response_text"]
    truths = batch.non_tensors.get("ground_truth")
    images = batch.non_tensors.get("images")
    mask = batch.tensors.get("response_mask")
    lengths = [int(x) for x in mask.sum(-1).tolist()] if mask is not None else [None] * n
    samples = []
    for i in range(n):
        truth = truths[i] if truths is not None else None
        imgs = images[i] if images is not None else None
        samples.append({
            "prompt": prompts[i],
            "response": responses[i],
            "response_length": lengths[i],
            "ground_truth": "" if truth is None else truth,
            "images": [] if imgs is None else list(imgs),
        })
    return samples


def _merge_chunks(label: str, parts: List[Tuple[Scores, Metrics]], offsets: List[int]) -> Tuple[Scores, Metrics]:
    """Concatenate per-chunk results in order; every chunk must report the same metric names."""
    scores: Scores = []
    metrics: Metrics = {}
    names = None
    for (part_scores, part_metrics), offset in zip(parts, offsets):
        if names is None:
            names = list(part_metrics)
            metrics = {k: [] for k in names}
        elif set(part_metrics) != set(names):
            raise RewardError(f"Reward function {label} must return the same metric names for every sample: "
                              f"samples from {offsets[0]} gave {sorted(names)}, samples from {offset} gave "
                              f"{sorted(part_metrics)}.")
        scores.extend(part_scores)
        for k in names:
            metrics[k].extend(part_metrics[k])
    return scores, metrics


def _actor_runtime_env() -> Dict[str, Any]:
    """Runtime env for reward actors: PYTHONPATH leads with the folder holding `mtrl`.

    Ray workers only find the driver's modules when the driver runs from the repository root (or MTRL is
    installed); this makes a source checkout work from any working directory. Any PYTHONPATH from the
    job's runtime env (or this process) is kept after it; Ray merges these env_vars into the job's.
    """
    import ray

    import mtrl

    root = os.path.dirname(os.path.dirname(os.path.abspath(mtrl.__file__)))
    job_env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    existing = job_env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    parts = [p for p in existing.split(os.pathsep) if p and p != root]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([root] + parts)}}


class RewardManager:
    """Computes sequence-level rewards for a batch; see the module docstring for the Ray / local paths."""

    def __init__(self, config: RewardConfig, config_dir: Optional[str] = None, *, use_ray: Optional[bool] = None):
        """`use_ray`: None = use Ray when it is initialised (checked at each `compute`); True / False forces."""
        if config.reward_type not in FUNCTION_FORMS:
            raise RewardError(f"RewardManager handles worker.reward.reward_type=function, sequential or batch; got "
                              f"{config.reward_type!r} (reward models are served elsewhere).")
        if not config.reward_fn_path:
            raise RewardError("worker.reward.reward_fn_path is not set: give `file.py` or `file.py:function`.")
        if config.num_cpus < 1:
            raise RewardError(f"worker.reward.num_cpus = {config.num_cpus} must be >= 1.")
        if config.timeout_s <= 0:
            raise RewardError(f"worker.reward.timeout_s = {config.timeout_s} must be > 0.")
        self.config = config
        self.reward_fn: RewardFunction = load_reward_function(config.reward_fn_path, config_dir,
                                                              config.reward_fn_kwargs, config.reward_type)
        self.use_ray = use_ray
        self._actors: Optional[List[Any]] = None

    # ------------------------------------------------------------------ public API

    def compute(self, batch: DataBatch) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """(scores: float32 (B,), metrics: {name: B floats}) for every row of `batch`."""
        samples = batch_to_samples(batch)
        if not samples:
            return torch.zeros(0, dtype=torch.float32), {}
        if self._ray_enabled():
            scores, metrics = self._compute_ray(samples)
        else:
            scores, metrics = self.reward_fn(samples, 0)
        return torch.tensor(scores, dtype=torch.float32), metrics

    def shutdown(self) -> None:
        """Kill the reward actors (if any). Safe to call more than once."""
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor, no_restart=True)
        self._actors = None

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ Ray path

    def _ray_enabled(self) -> bool:
        if self.use_ray is not None:
            return self.use_ray
        import sys

        # Do not import Ray just to learn that nobody started it.
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    def _ensure_actors(self) -> List[Any]:
        if self._actors is not None:
            return self._actors
        import ray

        actor_cls = ray.remote(num_cpus=1, max_restarts=0, runtime_env=_actor_runtime_env())(RewardWorker)
        spec = f"{self.reward_fn.file}:{self.reward_fn.name}"
        form = "batch" if self.reward_fn.batched else "sequential"  # as resolved here, whatever the file declares
        actors = [actor_cls.remote(spec, self.reward_fn.kwargs, form) for _ in range(self.config.num_cpus)]
        start_timeout = max(ACTOR_START_TIMEOUT_S, self.config.timeout_s)
        try:
            ray.get([a.ready.remote() for a in actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise RewardError(f"Could not start {self.config.num_cpus} reward actor(s) (1 CPU each, "
                              f"worker.reward.num_cpus) within {start_timeout:.0f} s; CPUs available in the Ray "
                              f"cluster now: {ray.available_resources().get('CPU', 0)}.") from None
        except ray.exceptions.RayError as e:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise self._unwrap(e) from None
        self._actors = actors
        return actors

    def _compute_ray(self, samples: List[Dict[str, Any]]) -> Tuple[Scores, Metrics]:
        import ray

        actors = self._ensure_actors()
        bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(len(samples)), len(actors))])
        offsets, refs = [], []
        for actor, start, end in zip(actors, bounds[:-1], bounds[1:]):
            if end > start:
                offsets.append(int(start))
                refs.append(actor.score.remote(samples[start:end], int(start)))
        started = time.monotonic()
        try:
            parts = ray.get(refs, timeout=self.config.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()  # the only way to stop a hung call; actors restart on the next compute
            raise RewardError(f"Reward function {self.reward_fn.label} did not finish scoring {len(samples)} samples "
                              f"within worker.reward.timeout_s = {self.config.timeout_s} s "
                              f"(waited {time.monotonic() - started:.1f} s).") from None
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise self._unwrap(e) from None
        return _merge_chunks(self.reward_fn.label, parts, offsets)

    def _unwrap(self, error: Exception) -> RewardError:
        """A RewardError raised inside an actor, without Ray's wrapping; other Ray failures described."""
        cause = getattr(error, "cause", None)
        if isinstance(cause, RewardError):
            return RewardError(str(cause))
        if isinstance(error, RewardError):  # Ray's dual-class RayTaskError(RewardError)
            return RewardError(str(error).strip().splitlines()[-1])
        return RewardError(f"Reward actor for {self.reward_fn.label} failed: {type(error).__name__}: {error}")
