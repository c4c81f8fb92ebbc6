"""Preference objectives: DPO (sigmoid / hinge / ipo) and the Bradley-Terry reward-model loss."""

from typing import Optional, Tuple, Union

import torch

from mtrl.optimization.masked import masked_sum

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def sequence_log_probs(log_probs: torch.Tensor, response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(batch,) total (or, with ``average``, mean) log-probability of each response's valid tokens."""
    total = masked_sum(log_probs, response_mask, dim=-1)
    if average:
        total = total / response_mask.to(total.dtype).sum(-1).clamp(min=1)
    return total


def compute_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards (as TRL's ``DPOTrainer.dpo_loss``).

    ``h = (pi_c - pi_r) - (ref_c - ref_r)`` from sequence log-probs (sums; for ``ipo`` pass per-token
    means, see ``sequence_log_probs(average=True)``):

    * ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv 2305.18290; conservative DPO with label smoothing eps):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
    * ``hinge`` (SLiC, Zhao et al. 2023, arXiv 2305.10425): ``relu(1 - beta h)``;
    * ``ipo`` (Azar et al. 2023, arXiv 2310.12036): ``(h - 1 / (2 beta))^2``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (pairs,); the rewards are
    ``beta * (pi - ref)`` and carry no gradient.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; known: {list(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1.0 - label_smoothing)
                  - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
    else:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards


def compute_bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                               margin: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """Per-pair reward-model loss ``-log sigmoid(r_c - r_r - margin)`` (Bradley-Terry; InstructGPT;
    the optional margin as in Llama 2, arXiv 2307.09288)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    return -torch.nn.functional.logsigmoid(diff)
