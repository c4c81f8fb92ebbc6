"""The rollout-engine interface every engine (HF generate, vLLM) implements.

An engine lives inside the actor worker process (hybrid engine). Each training step the worker
pushes the current policy weights into it (`load_weights`), asks for `n` responses per prompt
(`generate`), then lets it free its memory (`release`) before the training passes.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch

from mtrl.protocol import DataBatch
from mtrl.utils.seeding import sample_seed


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    # The step's seed: response k to prompt `uid` draws from `response_seeds(seed, ...)`, so the same
    # config gives the same responses whatever the worker count or micro-batch (engines that can).
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RolloutEngine(ABC):
    @abstractmethod
    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with the given full (unsharded) tensors, by HF parameter name."""

    @abstractmethod
    def generate(self, prompts: DataBatch, params: SamplingParams) -> DataBatch:
        """`prompts` in the collate layout (docs/DATA_LAYOUT.md), B rows -> B * n rows, interleaved.

        Returns every field of `prompts` repeated n times, plus tensors `prompts` (a copy of the
        left-padded `input_ids`), `responses` (B*n, R) right-padded with the pad id,
        `response_mask` (B*n, R) and `rollout_log_probs` (B*n, R) float32: the log-prob of each
        sampled token under the distribution it was drawn from (the behaviour policy of importance
        sampling: the engine's logits with the vision placeholders suppressed, divided by T, top-k and
        top-p applied; T = 1 when greedy, temperature 0), 0 where `response_mask` is 0. vLLM calls these
        "processed" log-probs, as verl uses them.
        R is at most `max_new_tokens`.
        """

    def load_adapter(self, tensors: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
        """Serve the policy as the loaded base weights plus this LoRA adapter (peft's tensor names and
        adapter_config.json), replacing the previous adapter (`worker.rollout.lora_sync=adapter`)."""
        raise NotImplementedError(f"{type(self).__name__} takes merged weights only (worker.rollout.lora_sync=merged)")

    @abstractmethod
    def release(self) -> None:
        """Free the engine's weights / caches until the next `load_weights`."""

    def metrics(self) -> Dict[str, float]:
        return {}


def response_mask_from_ids(responses: torch.Tensor, eos_token_ids: Iterable[int], pad_token_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after it.

    Tokens after the first EOS are set to `pad_token_id` in place, so that every engine returns
    the same layout whatever it does after stopping.
    """
    eos = torch.zeros_like(responses, dtype=torch.bool)
    for token_id in set(eos_token_ids):
        eos |= responses == token_id
    # A token is inside the response while no EOS occurred strictly before it.
    eos_before = (torch.cumsum(eos.long(), dim=1) - eos.long()) > 0
    mask = (~eos_before).long()
    responses.masked_fill_(mask == 0, pad_token_id)
    return mask


def response_seeds(seed: int, uids: Sequence[str], n: int) -> List[int]:
    """One seed per response, rows interleaved as `generate` returns them (response k of prompt `uid`)."""
    return [sample_seed(seed, k, str(uid)) for uid in uids for k in range(n)]
