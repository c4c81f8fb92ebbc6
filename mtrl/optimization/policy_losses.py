"""The losses of the RL update: loss aggregation with its global normalisers, the policy-loss registry
(``"ppo"``: dual-clip PPO, the default), the value loss, the entropy penalty and the entropy bonus
with its controller.

A policy loss is registered with ``register_policy_loss(name)`` and chosen by
``optimization.policy_loss``. Every policy loss has the signature of ``compute_policy_loss``::

    loss_fn(old_log_probs, log_probs, advantages, response_mask,
            clip_ratio_low, clip_ratio_high, clip_ratio_dual,      # the actor's clip settings
            loss_agg_mode="token-mean", token_mask=None,
            *, settings=DEFAULT_SETTINGS,                          # its own keys of OptimizationConfig
            rollout_is_weights=None,                               # rollout correction, (batch, len)
            global_token_count=None, global_seq_count=None, loss_scale_factor=None) -> (loss, metrics)

and returns the scalar loss (aggregated with ``aggregate_loss`` and the normalisers, so micro-batch
losses sum to the mini-batch loss) and metrics holding at least ``pg_clipfrac``,
``pg_clipfrac_lower`` and ``ppo_kl`` (``policy_loss_metrics``; a loss without clipping reports 0).
``token_mask`` (TPRL, 1 = receives gradient) zeroes the loss of filtered tokens, which still count
in the denominator; statistics a loss takes over tokens (sequence ratios, covariances) use only the
kept tokens (``kept_tokens``). ``rollout_is_weights`` (``rollout_correction``: truncated / masked importance
weights of pi_old / pi_rollout) multiply each token's loss, detached, as verl's ``rollout_is_weights`` do.
The other registered losses live in ``sequence_ratio_losses``, ``token_ratio_losses`` and
``covariance_losses``, which register themselves when imported (``policy_optimization`` imports them all).
"""

from typing import Callable, Dict, Optional, Tuple

import torch

from mtrl.optimization.config import OptimizationConfig
from mtrl.optimization.masked import Metrics, Number, compute_dtype, masked_mean, masked_sum
from mtrl.optimization.registry import Registry

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

PolicyLoss = Callable[..., Tuple[torch.Tensor, Metrics]]
POLICY_LOSSES = Registry("policy loss")
# The settings a loss sees when its caller gives none: every key at its default (never mutated).
DEFAULT_SETTINGS = OptimizationConfig()


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator registering a policy loss under ``name`` (the value of ``optimization.policy_loss``);
    the signature is the module docstring's."""
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as ``name``; ValueError listing the known names otherwise."""
    return POLICY_LOSSES.lookup(name)


def aggregate_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    *,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``(batch, len)`` to a scalar.

    Modes (a "sequence" counts only if it has at least one valid token):

    * ``token-mean``: sum over valid tokens / number of valid tokens (DAPO).
    * ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    * ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (original GRPO).
    * ``seq-mean-token-sum-norm``: sum over valid tokens / number of sequences / ``loss_scale_factor``
      (Dr.GRPO; the factor defaults to ``loss_mask.shape[-1]``, verl's choice).

    Micro-batch and data-parallel invariance. Without the optional counts the denominators are
    those of ``loss_mat`` itself. To make the gradient of a mini-batch independent of how it is cut
    into micro-batches and ranks:

    1. Before the micro-batch loop, count over the *whole mini-batch on all data-parallel ranks*
       (all-reduce SUM of the per-rank counts): ``global_token_count`` = number of valid tokens,
       ``global_seq_count`` = number of sequences with at least one valid token.
    2. Pass both to every micro-batch's call (each mode uses the one it needs). For
       ``seq-mean-token-sum-norm`` also pass a constant ``loss_scale_factor`` (e.g. the max response
       length) if micro-batches may be padded to different widths.
    3. The returned micro-batch losses then SUM (over micro-batches and over ranks) to the loss of
       the whole mini-batch: backpropagate each one and accumulate gradients without dividing by the
       number of micro-batches. FSDP/DDP *average* gradients across ranks, so multiply each loss by
       the world size before ``backward()`` to obtain the gradient of the mini-batch loss.
    """
    # Token counts reach 1e5+: bf16 could not even represent them exactly, so reduce in fp32 or wider.
    mask = loss_mask.to(compute_dtype(loss_mat.dtype))

    def count(local: torch.Tensor, given: Optional[Number]) -> torch.Tensor:
        # An empty (micro-)batch gives 0 / 1 = 0 instead of NaN.
        total = local if given is None else torch.as_tensor(given, dtype=mask.dtype, device=mask.device)
        return total.clamp(min=1)

    if mode == "token-mean":
        return masked_sum(loss_mat, mask) / count(mask.sum(), global_token_count)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {list(LOSS_AGG_MODES)}")
    tokens_per_seq = mask.sum(dim=-1)
    seq_loss = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-mean":
        seq_loss = seq_loss / tokens_per_seq.clamp(min=1)
    loss = seq_loss.sum() / count((tokens_per_seq > 0).to(mask.dtype).sum(), global_seq_count)
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def kept_tokens(response_mask: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The tokens that receive gradient: valid (``response_mask``) and kept by TPRL's ``token_mask``."""
    kept = response_mask.bool()
    return kept if token_mask is None else kept & token_mask.bool()


def aggregate_policy_loss(losses: torch.Tensor, response_mask: torch.Tensor, token_mask: Optional[torch.Tensor],
                          loss_agg_mode: str, rollout_is_weights: Optional[torch.Tensor] = None,
                          **normalisers: Optional[Number]) -> torch.Tensor:
    """A policy loss's per-token ``losses`` to its scalar: filtered tokens (``token_mask`` 0) lose their
    loss and gradient but stay in the denominator (``response_mask``); each token's loss is multiplied by
    its rollout-correction weight (detached; 0 = masked, still in the denominator); then ``aggregate_loss``."""
    if token_mask is not None:
        losses = losses * token_mask.to(losses.dtype)
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights.detach().to(losses.dtype)
    return aggregate_loss(losses, response_mask, loss_agg_mode, **normalisers)


def policy_loss_metrics(log_ratio: torch.Tensor, response_mask: torch.Tensor,
                        clipped: Optional[torch.Tensor] = None,
                        clipped_lower: Optional[torch.Tensor] = None) -> Metrics:
    """The metrics every policy loss reports, over valid tokens: ``pg_clipfrac`` / ``pg_clipfrac_lower``
    (fraction where ``clipped`` / ``clipped_lower`` holds; 0 when not given) and ``ppo_kl`` (mean of
    ``-log_ratio`` = ``old_log_probs - log_probs``, the k1 estimate of KL(pi_old || pi))."""
    with torch.no_grad():
        zero = log_ratio.new_zeros(())

        def fraction(flags: Optional[torch.Tensor]) -> torch.Tensor:
            return zero if flags is None else masked_mean(flags.float(), response_mask)

        return {"pg_clipfrac": fraction(clipped), "pg_clipfrac_lower": fraction(clipped_lower),
                "ppo_kl": masked_mean(-log_ratio.detach(), response_mask)}


@register_policy_loss("ppo")
def compute_policy_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_dual: float,
    loss_agg_mode: str = "token-mean",
    token_mask: Optional[torch.Tensor] = None,
    *,
    settings: OptimizationConfig = DEFAULT_SETTINGS,
    rollout_is_weights: Optional[torch.Tensor] = None,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped PPO surrogate with dual clip (Schulman et al. 2017; Ye et al. 2020): the ``"ppo"`` policy loss.

    ``r = exp(log_probs - old_log_probs)`` (log-ratio clamped to [-20, 20]);
    per token ``L = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))`` and, where A < 0,
    ``L = min(L, -A clip_ratio_dual)`` so a very large ratio cannot make a negative-advantage token's
    loss unbounded. ``token_mask`` (1 = keep, the TPRL filter) zeroes the loss of filtered tokens,
    which still count in the denominator (``response_mask``). Aggregated with ``aggregate_loss``;
    the keyword-only counts are its invariance normalisers. ``settings`` holds no PPO key: PPO's are
    the actor's clip ratios.

    Metrics, over all valid tokens: ``pg_clipfrac`` (fraction where the clipped term is active),
    ``pg_clipfrac_lower`` (fraction where the dual clip is active), ``ppo_kl`` (mean of
    ``old_log_probs - log_probs``, the k1 estimate of KL(pi_old || pi)).
    """
    if clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1 (dual-clip PPO), got {clip_ratio_dual}")
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    ppo_losses = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_ratio_dual
    negative = advantages < 0
    losses = torch.where(negative, torch.minimum(ppo_losses, dual_bound), ppo_losses)
    loss = aggregate_policy_loss(losses, response_mask, token_mask, loss_agg_mode, rollout_is_weights,
                                 global_token_count=global_token_count, global_seq_count=global_seq_count,
                                 loss_scale_factor=loss_scale_factor)
    return loss, policy_loss_metrics(log_ratio, response_mask, clipped > unclipped,
                                     negative & (ppo_losses > dual_bound))


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    *,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 * agg(max((v - R)^2, (clip(v, V_old +- c) - R)^2))``.

    ``values`` are the critic's predictions at rollout time; the new prediction may move at most
    ``cliprange_value`` from them before the clipped term takes over. Returns the loss and the
    fraction of valid tokens where the clipped term is the larger (a detached 0-d tensor).
    """
    vpreds_clipped = torch.clamp(vpreds, min=values - cliprange_value, max=values + cliprange_value)
    unclipped = (vpreds - returns) ** 2
    clipped = (vpreds_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped, clipped), response_mask, loss_agg_mode,
                                global_token_count, global_seq_count, loss_scale_factor=loss_scale_factor)
    clipfrac = masked_mean((clipped > unclipped).float(), response_mask).detach()
    return loss, clipfrac


def compute_entropy_penalty(
    log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    coef: float = 1.0,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Entropy penalty term ``coef * agg(-log_probs)``: the sampled-token estimate of the policy entropy.

    Added to the loss when ``optimization.use_entropy_penalty`` is on, with
    ``coef = entropy_penalty_coef`` — pass it here or multiply the default ``coef=1`` result
    yourself (useful to log the unscaled term), not both. Same aggregation and normalisers as the
    policy loss.
    """
    return coef * aggregate_loss(-log_probs, response_mask, loss_agg_mode, global_token_count, global_seq_count,
                                 loss_scale_factor=loss_scale_factor)


def compute_entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                          coef: float = 1.0, **normalisers: Optional[Number]) -> torch.Tensor:
    """Entropy bonus term ``-coef * agg(entropy)`` (verl's ``entropy_coeff``), a loss to add.

    ``entropy`` is the full next-token entropy per response token (``entropy_from_logits``, with its
    graph), so unlike the sampled-token penalty above its gradient raises the entropy: it keeps a
    policy exploring instead of collapsing onto one answer before the reward can tell answers apart.
    Added when ``optimization.entropy_bonus_coef`` > 0, with the policy loss's aggregation and normalisers.
    """
    return -coef * aggregate_loss(entropy, response_mask, loss_agg_mode, **normalisers)


class EntropyBonusController:
    """The entropy bonus coefficient, fixed or steered towards a target entropy.

    ``fixed``: ``coefficient(entropy)`` is always ``coef``. ``adaptive`` (adaptive entropy control,
    Skywork-OR1, arXiv 2505.22312): after each batch with mean response-token entropy ``H``,
    ``value = max(0, value + step * sign(target - H))``, and the bonus applies only while ``H < target``
    (coefficient 0 above it). The bonus then holds the entropy near the target: it cannot drive the
    policy to noise (as a fixed coefficient large enough to stop a collapse can), nor let it collapse.
    Only ``value`` is checkpointed; target and step come from the config.
    """

    def __init__(self, controller_type: str, coef: float, target: float = 0.5, step: float = 0.005):
        if controller_type not in ("fixed", "adaptive"):
            raise ValueError(f"unknown entropy bonus controller {controller_type!r}; known: ['adaptive', 'fixed']")
        if controller_type == "adaptive" and (target <= 0 or step <= 0):
            raise ValueError(f"adaptive entropy control needs target > 0 and step > 0, got {target}, {step}")
        self.adaptive = controller_type == "adaptive"
        self.value = float(coef)
        self.target = float(target)
        self.step = float(step)

    def coefficient(self, current_entropy: Number) -> float:
        """The coefficient for a batch whose mean response-token entropy is ``current_entropy``
        (adaptive: updates ``value`` first)."""
        if not self.adaptive:
            return self.value
        below = float(current_entropy) < self.target
        self.value = max(0.0, self.value + (self.step if below else -self.step))
        return self.value if below else 0.0

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
