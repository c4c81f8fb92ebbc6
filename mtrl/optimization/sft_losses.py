"""Supervised objectives: the SFT loss on response tokens and CHORD's schedule (mu) and token weights (phi)."""

from typing import Optional

import numpy as np
import torch

from mtrl.optimization.masked import Number
from mtrl.optimization.policy_losses import aggregate_loss


def compute_chord_mu(step: Number, mu_warmup_steps: int, mu_decay_steps: int, mu_peak: float,
                     mu_valley: float) -> float:
    """The CHORD weight of the SFT loss at ``step`` (CHORD, Zhang et al. 2025, arXiv 2508.11408).

    * warmup ``step < mu_warmup_steps``: linear from 0 to ``mu_peak``: ``mu_peak * step / mu_warmup_steps``;
    * decay ``step < mu_warmup_steps + mu_decay_steps``: cosine from ``mu_peak`` to ``mu_valley``:
      ``mu_valley + (mu_peak - mu_valley) * 0.5 * (1 + cos(pi * (step - mu_warmup_steps) / mu_decay_steps))``;
    * afterwards ``mu_valley``.

    A phase with zero steps is skipped (no warmup and no decay: ``mu_valley`` throughout; set
    ``mu_peak = mu_valley`` for a constant mu). Same schedule as Trinity-RFT's ``mix_chord`` policy loss.
    """
    step = float(step)
    if mu_warmup_steps > 0 and step < mu_warmup_steps:
        return mu_peak * step / mu_warmup_steps
    if mu_decay_steps > 0 and step < mu_warmup_steps + mu_decay_steps:
        progress = (step - mu_warmup_steps) / mu_decay_steps
        return mu_valley + (mu_peak - mu_valley) * 0.5 * (1.0 + float(np.cos(np.pi * progress)))
    return mu_valley


def compute_chord_phi(log_probs: torch.Tensor) -> torch.Tensor:
    """CHORD-phi token weights ``sg(p (1 - p))`` with ``p = exp(log_probs)`` (no gradient).

    Tokens the policy is already sure of (p near 1) or finds implausible (p near 0) weigh little;
    the weight peaks at 1/4 for p = 1/2.
    """
    p = torch.exp(log_probs.detach().float())
    return (p * (1.0 - p)).to(log_probs.dtype)


def compute_sft_loss(
    log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    enable_phi_function: bool = False,
    *,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens: ``agg(-log_probs [* phi])``.

    ``response_mask`` selects the tokens that get the loss (response tokens of expert / SFT rows);
    with ``enable_phi_function`` each token is weighted by ``compute_chord_phi`` (CHORD-phi). The
    aggregation and its global normalisers are those of ``aggregate_loss``, so micro-batch losses sum
    to the loss of the whole mini-batch.
    """
    nll = -log_probs
    if enable_phi_function:
        nll = nll * compute_chord_phi(log_probs)
    return aggregate_loss(nll, response_mask, loss_agg_mode, global_token_count, global_seq_count,
                          loss_scale_factor=loss_scale_factor)
