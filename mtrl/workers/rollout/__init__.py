"""Rollout engines: `hf` (transformers generate, runs everywhere) and `vllm` (optional extra)."""

from mtrl.workers.rollout.base import RolloutEngine, SamplingParams, response_mask_from_ids


def check_engine_available(name: str) -> None:
    """Fail at start, not mid-run, when the configured engine cannot be used here."""
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "worker.rollout.name=vllm but vLLM is not installed. Install it with `pip install mtrl[vllm]` "
                "(GPU) or use the transformers engine: worker.rollout.name=hf.") from None
        raise RuntimeError("worker.rollout.name=vllm: the vLLM engine is not implemented in this version of MTRL "
                           "yet; use worker.rollout.name=hf.")


__all__ = ["RolloutEngine", "SamplingParams", "response_mask_from_ids", "check_engine_available"]
