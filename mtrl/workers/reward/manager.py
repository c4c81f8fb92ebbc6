"""`RewardManager`: score a `DataBatch` with the configured reward function, in Ray actors or in-process.

Where it runs
  * Ray path (Ray is initialised, or `use_ray=True`): `worker.reward.num_cpus` actors, each reserving
    one CPU, each holding its own copy of the reward function. One actor with `num_cpus` CPUs would
    not help: a Python reward function runs on one core per process (the GIL), so N single-CPU
    processes are what actually use N cores. They start at the first `compute`, or ahead with `start()` (the
    trainer does, so they start alongside its workers). The batch is cut into contiguous chunks, one per actor,
    scored concurrently and put back together in order. Scoring must finish within
    `worker.reward.timeout_s` (actor start-up has its own limit, ACTOR_START_TIMEOUT_S), otherwise
    the actors are killed (a hung function cannot be stopped any other way) and a `RewardError` is
    raised; they are started again on the next call. A reward function that hangs or kills its
    process therefore never takes the trainer with it.
  * Local path (Ray not initialised, or `use_ray=False`): the function runs in this process; used by
    unit tests and tools. `timeout_s` is not enforced there (a running Python call cannot be stopped).

Faults (`worker.reward.on_error`): with `raise` (the default) the first failing sample stops the run
with a `RewardError` naming it (row, uid, prompt and response heads) and the function. With `zero`
each failing sample scores 0 (its metrics too), a warning names it, and the per-sample column
`errors` (1 = scored 0) is added to the metrics, logged as the count `reward/errors`; a timeout or a
dead actor zeroes the samples it was scoring.

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
from mtrl.utils.logger import get_logger
from mtrl.workers.reward.function import (FUNCTION_FORMS, ON_ERROR_CHOICES, Errors, Metrics, RewardError,
                                          RewardFunction, SampleNames, Scores, load_reward_function)
from mtrl.workers.reward.worker import RewardWorker

logger = get_logger(__name__)
# Warnings per batch for samples scored 0 (on_error=zero); the rest are only counted.
MAX_LOGGED_ERRORS = 3

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


def batch_uids(batch: DataBatch) -> Optional[List[str]]:
    """The rows' names for messages: `sample_uid` (prompt uid / response index) or `uid`, when the batch has one."""
    for key in ("sample_uid", "uid"):
        if key in batch.non_tensors:
            return [str(u) for u in batch.non_tensors[key]]
    return None


def _merge_chunks(label: str, parts: List[Tuple[Scores, Metrics, Errors]],
                  offsets: List[int]) -> Tuple[Scores, Metrics, Errors]:
    """Concatenate per-chunk results in order; every chunk must report the same metric names.

    A chunk scored entirely 0 by on_error=zero reports no metric names; its samples get 0 for the others'.
    """
    scores: Scores = []
    errors: Errors = []
    names = next((list(m) for _, m, _ in parts if m), [])
    metrics: Metrics = {k: [] for k in names}
    for (part_scores, part_metrics, part_errors), offset in zip(parts, offsets):
        errors.extend(part_errors)
        if not part_metrics and len(part_errors) == len(part_scores):
            part_metrics = {k: [0.0] * len(part_scores) for k in names}
        if set(part_metrics) != set(names):
            raise RewardError(f"Reward function {label} must return the same metric names for every sample: "
                              f"samples from {offsets[0]} gave {sorted(names)}, samples from {offset} gave "
                              f"{sorted(part_metrics)}.")
        scores.extend(part_scores)
        for k in names:
            metrics[k].extend(part_metrics[k])
    return scores, metrics, errors


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
        if config.on_error not in ON_ERROR_CHOICES:
            raise RewardError(f"worker.reward.on_error = {config.on_error!r} must be one of {ON_ERROR_CHOICES}.")
        self.config = config
        self.reward_fn: RewardFunction = load_reward_function(config.reward_fn_path, config_dir,
                                                              config.reward_fn_kwargs, config.reward_type)
        self.use_ray = use_ray
        self._actors: Optional[List[Any]] = None
        self._starting: Optional[List[Any]] = None  # created by `start`, not yet waited for

    def start(self) -> None:
        """On the Ray path, create the reward actors now rather than at the first `compute`, without waiting for
        them: their processes then start while the trainer starts its workers. `compute` waits for them."""
        if self._ray_enabled() and self._actors is None and self._starting is None:
            self._starting = self._create_actors()

    # ------------------------------------------------------------------ public API

    def compute(self, batch: DataBatch) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """(scores: float32 (B,), metrics: {name: B floats}) for every row of `batch`.

        With on_error=zero the metrics also hold `errors`: 1.0 for each row scored 0 because its reward failed.
        """
        samples = batch_to_samples(batch)
        if not samples:
            return torch.zeros(0, dtype=torch.float32), {}
        uids = batch_uids(batch)
        if self._ray_enabled():
            scores, metrics, errors = self._compute_ray(samples, uids)
        else:
            scores, metrics, errors = self.reward_fn.score(samples, 0, self.config.on_error, uids)
        if self.config.on_error == "zero":
            metrics = {**metrics, "errors": self._error_column(errors, len(samples))}
        return torch.tensor(scores, dtype=torch.float32), metrics

    @staticmethod
    def _error_column(errors: Errors, n: int) -> List[float]:
        """Log the errors (the first few distinct messages in full) and mark their rows with 1.0."""
        messages = list(dict.fromkeys(message for _, message in errors))
        for message in messages[:MAX_LOGGED_ERRORS]:
            logger.warning("worker.reward.on_error=zero: scored 0: %s", message)
        if len(messages) > MAX_LOGGED_ERRORS:
            logger.warning("worker.reward.on_error=zero: %d more failures in this batch (%d samples scored 0 in all).",
                           len(messages) - MAX_LOGGED_ERRORS, len(errors))
        failed = {row for row, _ in errors}
        return [1.0 if i in failed else 0.0 for i in range(n)]

    def shutdown(self) -> None:
        """Kill the reward actors (if any). Safe to call more than once."""
        actors = (self._actors or []) + (self._starting or [])
        if actors:
            import ray

            for actor in actors:
                ray.kill(actor, no_restart=True)
        self._actors = self._starting = None

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

    def _create_actors(self) -> List[Any]:
        import ray

        actor_cls = ray.remote(num_cpus=1, max_restarts=0, runtime_env=_actor_runtime_env())(RewardWorker)
        spec = f"{self.reward_fn.file}:{self.reward_fn.name}"
        form = "batch" if self.reward_fn.batched else "sequential"  # as resolved here, whatever the file declares
        return [actor_cls.remote(spec, self.reward_fn.kwargs, form, self.config.on_error)
                for _ in range(self.config.num_cpus)]

    def _ensure_actors(self) -> List[Any]:
        if self._actors is not None:
            return self._actors
        import ray

        actors, self._starting = self._starting or self._create_actors(), None
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
            raise self._unwrap(e, "while starting") from None
        self._actors = actors
        return actors

    def _compute_ray(self, samples: List[Dict[str, Any]],
                     uids: Optional[List[str]]) -> Tuple[Scores, Metrics, Errors]:
        import ray

        actors = self._ensure_actors()
        bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(len(samples)), len(actors))])
        chunks, refs = [], []
        for actor, start, end in zip(actors, bounds[:-1], bounds[1:]):
            if end > start:
                chunks.append((int(start), int(end)))
                refs.append(actor.score.remote(samples[start:end], int(start), uids[start:end] if uids else None))
        started = time.monotonic()
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.config.timeout_s)
        done = set(done)
        parts, failed = [], False
        for ref, (start, end) in zip(refs, chunks):
            chunk = f"samples {start}..{end - 1}, first: {SampleNames(samples, 0, uids)(start)}"
            if ref in done:
                try:
                    parts.append(ray.get(ref))
                    continue
                except ray.exceptions.RayError as e:
                    error = self._unwrap(e, chunk)
            else:
                error = RewardError(f"Reward function {self.reward_fn.label} did not finish scoring {len(samples)} "
                                    f"samples within worker.reward.timeout_s = {self.config.timeout_s} s (waited "
                                    f"{time.monotonic() - started:.1f} s; still running: {chunk}).")
            failed = True
            if self.config.on_error == "raise":
                self.shutdown()  # the only way to stop a hung call; actors restart on the next compute
                raise error
            parts.append(([0.0] * (end - start), {}, [(row, str(error)) for row in range(start, end)]))
        if failed:
            self.shutdown()
        return _merge_chunks(self.reward_fn.label, parts, [start for start, _ in chunks])

    def _unwrap(self, error: Exception, chunk: str) -> RewardError:
        """A RewardError raised inside an actor, without Ray's wrapping; other Ray failures described."""
        cause = getattr(error, "cause", None)
        if isinstance(cause, RewardError):
            return RewardError(str(cause))
        if isinstance(error, RewardError):  # Ray's dual-class RayTaskError(RewardError)
            return RewardError(str(error).strip().splitlines()[-1])
        return RewardError(f"Reward actor for {self.reward_fn.label} failed ({chunk}): {type(error).__name__}: "
                           f"{error}")
