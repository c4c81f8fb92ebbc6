"""Rollout engines: `hf` (transformers generate, runs everywhere) and `vllm` (optional extra)."""

from mtrl.workers.rollout.base import RolloutEngine, SamplingParams, response_mask_from_ids


def check_engine_available(name: str) -> None:
    """Fail at start, not mid-run, when the configured engine cannot be used here."""
    if name == "vllm":
        from mtrl.workers.rollout.vllm_engine import vllm_version_problem

        problem = vllm_version_problem()
        if problem:
            raise RuntimeError(problem)


__all__ = ["RolloutEngine", "SamplingParams", "response_mask_from_ids", "check_engine_available"]
