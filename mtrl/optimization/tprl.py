"""TPRL (token perception RL, after VPPO, arXiv 2510.09285): token visual dependency, token gradient
filtering (TGF: entropy / perception token masks) and trajectory advantage shaping (TAS).

``apply_tprl`` is the one entry point the trainer calls on the whole batch; the functions below it
are the steps, each usable alone. Decisions that take a batch-wide minimum, maximum or quantile
must be given the GLOBAL batch, so that results do not depend on the number of workers.
"""

from typing import Dict, Optional, Tuple

import torch

from mtrl.optimization.config import OptimizationConfig
from mtrl.optimization.log_probs import kl_from_logits
from mtrl.optimization.masked import Metrics, compute_dtype, masked_mean

FILTER_SCOPES = ("sequence", "batch")
DEPENDENCY_ESTIMATORS = ("sampled_k3", "full_kl")


@torch.no_grad()
def apply_tprl(tensors: Dict[str, torch.Tensor], opt: OptimizationConfig) -> Metrics:
    """Every TPRL decision for the whole batch, written into its columns ``tensors``; returns the metrics.

    Reads ``response_mask`` and ``advantages`` and, where present, ``entropys`` (the rollout policy's
    token entropy, for entropy filtering) and the perception pass's result: ``dependency`` (the
    worker's exact ``full_kl`` scores) or else ``aug_log_probs`` (log-probs with perturbed images),
    turned into ``dependency`` against ``old_log_probs`` with the ``sampled_k3`` estimator. Without
    either (perception pass off, or a batch without images) perception filtering and trajectory
    scaling have nothing to act on and are skipped.

    Writes ``dependency`` (when computed here), ``token_mask`` (when a filter is on: the OR of the
    entropy and perception selections, ``compute_tprl_token_mask``) and, with
    ``enable_trajectory_reweighting``, ``advantages`` scaled per response by
    ``compute_trajectory_scaling``. Metrics are those of ``compute_tprl_token_mask`` and
    ``compute_trajectory_metrics`` (bare names; the trainer logs them as ``actor/...``).
    """
    mask = tensors["response_mask"]
    if "dependency" not in tensors and "aug_log_probs" in tensors:
        tensors["dependency"] = compute_visual_dependency(tensors["old_log_probs"], tensors["aug_log_probs"], mask,
                                                          estimator="sampled_k3")
    dependency = tensors.get("dependency")
    token_mask, metrics = compute_tprl_token_mask(
        mask, entropy=tensors["entropys"] if opt.enable_entropy_filtering else None,
        dependency=dependency if opt.enable_perception_filtering else None,
        top_p_entropy=opt.top_p_entropy_tokens, top_p_perception=opt.top_p_perception_tokens,
        scope=opt.filter_scope)
    if token_mask is not None:
        tensors["token_mask"] = token_mask
    if opt.enable_trajectory_reweighting and dependency is not None:
        alpha = compute_trajectory_scaling(dependency, mask, opt.trajectory_scaling_min, opt.trajectory_scaling_max)
        tensors["advantages"] = tensors["advantages"] * alpha.unsqueeze(-1)
        metrics.update(compute_trajectory_metrics(dependency, mask, alpha))
    return metrics


@torch.no_grad()
def compute_visual_dependency(
    log_probs: torch.Tensor,
    aug_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "sampled_k3",
    logits: Optional[torch.Tensor] = None,
    aug_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token visual dependency S_t: how much the policy at t changes when the images are perturbed.

    * ``sampled_k3`` (default): ``d = aug_log_probs - log_probs`` (sampled token, perturbed minus
      clean image), ``S = clamp(exp(d) - d - 1, 0, 10)``, the k3 estimate of KL(pi(.|I) || pi(.|I')).
    * ``full_kl``: the exact ``KL(pi(.|I) || pi(.|I'))`` over the vocabulary, from ``logits`` (clean)
      and ``aug_logits`` (perturbed), each (batch, len, vocab); computed in fp32 chunks, floored at 0
      against rounding; the log-prob arguments are not used.

    Returns (batch, len) scores, 0 on padding, without gradient.
    """
    if estimator == "sampled_k3":
        # S(d) >= 10 already for |d| >= 12, so clamping d to +-20 changes nothing but avoids inf - inf.
        d = aug_log_probs.to(compute_dtype(aug_log_probs.dtype)) - log_probs.to(compute_dtype(log_probs.dtype))
        d = torch.clamp(d, min=-20.0, max=20.0)
        scores = torch.clamp(torch.exp(d) - d - 1, min=0.0, max=10.0)
    elif estimator == "full_kl":
        if logits is None or aug_logits is None:
            raise ValueError("the full_kl dependency estimator needs logits and aug_logits")
        scores = kl_from_logits(logits, aug_logits).clamp(min=0.0)
    else:
        raise ValueError(f"unknown dependency estimator {estimator!r}; known: {list(DEPENDENCY_ESTIMATORS)}")
    return torch.where(response_mask.bool(), scores, torch.zeros_like(scores))


def _keep_count(top_p: float, n_valid: torch.Tensor) -> torch.Tensor:
    # ceil(top_p * n) with a tolerance: 0.1 * 30 is 3.0000000000000004 in floating point, which must
    # keep 3 tokens, not 4.
    return torch.ceil(n_valid.double() * top_p - 1e-6).clamp(min=0).long()


def _top_k_per_row(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the k[i] highest-scoring valid tokens of each row; ties go to the earlier token."""
    # Two stable sorts give the order (valid first, then score descending, then position ascending).
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_validity = torch.sort(valid.gather(-1, by_score).to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, by_validity)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous())
    return (rank < k.unsqueeze(-1)) & valid


@torch.no_grad()
def select_top_tokens(
    scores: torch.Tensor, response_mask: torch.Tensor, top_p: float, scope: str = "sequence"
) -> torch.Tensor:
    """0/1 float mask of the highest-scoring valid tokens (token gradient filtering).

    * ``scope="sequence"``: in each response with n valid tokens, keep exactly ``ceil(top_p * n)``
      (an empty response keeps nothing).
    * ``scope="batch"``: keep exactly ``ceil(top_p * N)`` of the N valid tokens of the whole batch
      (one batch-wide quantile threshold). Pass the global batch for results that do not depend on
      the number of devices.

    Ties are broken deterministically by position: among equal scores the earlier token (in
    row-major order for ``batch``) is kept first, so exactly the stated count is kept. ``top_p=1``
    keeps every valid token; ``top_p=0`` keeps none. Scores must be finite.
    """
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if scope not in FILTER_SCOPES:
        raise ValueError(f"unknown filter scope {scope!r}; known: {list(FILTER_SCOPES)}")
    valid = response_mask.bool()
    if scope == "sequence":
        keep = _top_k_per_row(scores, valid, _keep_count(top_p, valid.sum(dim=-1)))
    else:
        flat_valid = valid.reshape(1, -1)
        keep = _top_k_per_row(scores.reshape(1, -1), flat_valid, _keep_count(top_p, flat_valid.sum(dim=-1)))
        keep = keep.view_as(valid)
    return keep.float()


def _selection_metrics(name: str, scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> Metrics:
    scores = scores.detach().float()
    rejected = valid & ~keep
    kept_scores = torch.where(keep, scores, torch.full_like(scores, float("inf")))
    return {
        f"{name}_token_fraction": keep.sum() / valid.sum().clamp(min=1),
        f"{name}_threshold": kept_scores.min() if bool(keep.any()) else scores.new_zeros(()),
        f"{name}_selected_mean": masked_mean(scores, keep),
        f"{name}_rejected_mean": masked_mean(scores, rejected),
    }


@torch.no_grad()
def compute_tprl_token_mask(
    response_mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    dependency: Optional[torch.Tensor] = None,
    top_p_entropy: float = 0.2,
    top_p_perception: float = 0.2,
    scope: str = "sequence",
) -> Tuple[Optional[torch.Tensor], Metrics]:
    """TPRL token filter: the OR of the entropy and the perception (visual dependency) selections.

    A filter is on when its scores are given (``entropy``: the current policy's token entropy;
    ``dependency``: ``compute_visual_dependency``). Returns ``(token_mask, metrics)``; token_mask is a
    0/1 float tensor (1 = the token receives policy gradient), or None when both filters are off.

    Metrics, for each active filter ``f`` in (entropy, perception): ``f_token_fraction`` (kept /
    valid tokens), ``f_threshold`` (lowest kept score; 0 if nothing kept), ``f_selected_mean`` and
    ``f_rejected_mean`` (mean score of kept / not-kept valid tokens); plus ``kept_token_fraction``
    for the combined mask.
    """
    valid = response_mask.bool()
    selections, metrics = [], {}
    for name, scores, top_p in (("entropy", entropy, top_p_entropy), ("perception", dependency, top_p_perception)):
        if scores is None:
            continue
        keep = select_top_tokens(scores, response_mask, top_p, scope)
        selections.append(keep)
        metrics.update(_selection_metrics(name, scores, valid, keep.bool()))
    if not selections:
        return None, {}
    token_mask = selections[0] if len(selections) == 1 else torch.maximum(selections[0], selections[1])
    metrics["kept_token_fraction"] = token_mask.sum() / valid.sum().clamp(min=1)
    return token_mask, metrics


@torch.no_grad()
def compute_trajectory_scaling(
    dependency: torch.Tensor,
    response_mask: torch.Tensor,
    scaling_min: float,
    scaling_max: Optional[float] = None,
) -> torch.Tensor:
    """TAS factors alpha (batch,): responses that depend more on the image get larger advantages.

    ``S_i`` = mean of the token dependency over response i; ``n_i = (S_i - min) / (max - min)`` with
    min/max over the non-empty responses of the given batch — pass the GLOBAL batch, so the result
    does not depend on the device count. ``scaling_max=None``: ``alpha_i = m + n_i (1 - m) / mean(n)``,
    so the mean alpha over non-empty responses is exactly 1; a float M: ``alpha_i = m + (M - m) n_i``.
    alpha = 1 for every response when fewer than 2 responses are non-empty or ``max - min <= 1e-6``.
    Empty responses always get alpha = 1 and do not count in min, max or mean(n).
    The caller applies ``A_i <- alpha_i * A_i``.
    """
    if scaling_min < 0 or (scaling_max is None and scaling_min > 1):
        raise ValueError(f"trajectory_scaling_min must be in [0, 1], got {scaling_min}")
    if scaling_max is not None and scaling_max < scaling_min:
        raise ValueError(f"trajectory_scaling_max ({scaling_max}) must be >= trajectory_scaling_min ({scaling_min})")
    dependency = dependency.float()
    non_empty = response_mask.bool().any(dim=-1)
    alpha = torch.ones(dependency.shape[0], dtype=dependency.dtype, device=dependency.device)
    if int(non_empty.sum()) < 2:
        return alpha
    s = masked_mean(dependency, response_mask, dim=-1)[non_empty]
    low, high = s.min(), s.max()
    if float(high - low) <= 1e-6:
        return alpha
    n = (s - low) / (high - low)
    if scaling_max is None:
        alpha[non_empty] = scaling_min + n * (1.0 - scaling_min) / n.mean()
    else:
        alpha[non_empty] = scaling_min + (scaling_max - scaling_min) * n
    return alpha


@torch.no_grad()
def compute_trajectory_metrics(
    dependency: torch.Tensor, response_mask: torch.Tensor, scaling: torch.Tensor
) -> Metrics:
    """TAS metrics: ``sensitivity_score_mean`` (mean token dependency over valid tokens) and
    ``scaling_factor_mean`` / ``_max`` / ``_min`` over all responses of the batch."""
    scaling = scaling.float()
    return {
        "sensitivity_score_mean": masked_mean(dependency.float(), response_mask),
        "scaling_factor_mean": scaling.mean(),
        "scaling_factor_max": scaling.max(),
        "scaling_factor_min": scaling.min(),
    }
