"""The data-parallel policy agent: log-prob passes and the clipped-PPO update step on one rank's data.

The agent sees only this rank's share of the batch. It makes the gradient independent of how the
data is split: every micro-batch loss is normalised by the token (or sequence) count of the whole
mini-batch over all ranks, and multiplied by the world size because FSDP averages gradients over
ranks. Summing the micro-batch gradients then gives exactly the full mini-batch gradient.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from mtrl.agents.optimizer_step import SkippedUpdates, clipped_optimizer_step
from mtrl.config.worker import ActorConfig
from mtrl.models.packing import forward_micro_batch
from mtrl.models.shared_prompts import (
    can_share_prompts,
    forward_shared_prompts,
    keep_cache_under_checkpointing,
    shared_prompt_plan,
)
from mtrl.models.ulysses import SequenceParallel, check_heads_divisible, install_sequence_parallel
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch
from mtrl.utils.seqlen_balancing import micro_batches_by_token_budget, num_micro_batches_by_token_budget

# Tensors a forward pass needs; everything else in the batch stays on the controller's side.
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "responses")


def make_micro_batches(batch: DataBatch, micro_batch_size: int, dynamic: bool, max_token_len: int,
                       keep_groups: bool = False) -> List[Tuple[DataBatch, List[int]]]:
    """Micro-batches with the row indices they hold: fixed size, or by a token budget (dynamic batching).

    Under FSDP every rank must run the same number of forward passes (each one all-gathers
    parameters), so with dynamic batching all ranks use the largest micro-batch count of any rank.
    The controller gives every rank the same number of rows, so fixed sizes already agree.
    `keep_groups`: the token budget is filled with whole groups (rows of one `uid`: one prompt's
    responses), so that a shared-prompt forward finds them together.
    """
    if not dynamic:
        groups = [list(range(i, min(i + micro_batch_size, len(batch))))
                  for i in range(0, len(batch), micro_batch_size)]
        return [(batch.index(g), g) for g in groups]
    lengths = batch.tensors["attention_mask"].sum(-1).tolist()
    units = [[i] for i in range(len(batch))]
    if keep_groups and "uid" in batch.non_tensors:
        units = _groups_within_budget(batch.non_tensors["uid"], lengths, max_token_len)
    unit_lengths = [sum(lengths[i] for i in unit) for unit in units]
    count = torch.tensor(num_micro_batches_by_token_budget(unit_lengths, max_token_len))
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    if int(count) > len(units):  # another rank needs more micro-batches than this one has groups
        units, unit_lengths = [[i] for i in range(len(batch))], lengths
    parts = micro_batches_by_token_budget(unit_lengths, max_token_len, min_num_micro_batches=int(count))
    groups = [sorted(i for u in part for i in units[u]) for part in parts]
    return [(batch.index(g), g) for g in groups]


def _groups_within_budget(uids, lengths: List[int], max_token_len: int) -> List[List[int]]:
    """The rows of each uid, a group over the token budget cut into consecutive pieces that fit it."""
    by_uid: Dict[object, List[int]] = {}
    for i, uid in enumerate(uids):
        by_uid.setdefault(uid, []).append(i)
    units: List[List[int]] = []
    for rows in by_uid.values():
        units.append([])
        tokens = 0
        for i in rows:
            if units[-1] and tokens + lengths[i] > max_token_len:
                units.append([])
                tokens = 0
            units[-1].append(i)
            tokens += lengths[i]
    return units


def global_normalisers(mini_batch: DataBatch, device: torch.device) -> Dict[str, float]:
    """Token and sequence counts of a mini-batch summed over all data-parallel ranks."""
    return _global_counts([mini_batch.tensors["response_mask"]], device)[0]


def _global_counts(masks: List[torch.Tensor], device: torch.device) -> List[Dict[str, float]]:
    """`global_normalisers` of several masks of one mini-batch, with a single all-reduce."""
    # Empty responses are not sequences for the seq-* aggregation modes.
    counts = torch.tensor([[float(m.sum()), float((m.sum(-1) > 0).sum())] for m in masks],
                          dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return [{"global_token_count": float(c[0]), "global_seq_count": float(c[1])} for c in counts]


def all_reduce_sums(values: Dict[str, float], device: torch.device, op=dist.ReduceOp.SUM) -> Dict[str, float]:
    """Sum (or reduce by `op`) each value over ranks with one all-reduce (every rank must hold the same keys)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and keys:
        dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def token_weighted(metrics: Dict[str, torch.Tensor], mask: torch.Tensor, global_token_count: float) -> Dict[str, float]:
    """Token means over one micro-batch as its share of the mean over the whole mini-batch (all ranks):
    summed over micro-batches and ranks, like the normalised losses, they give the global token mean."""
    weight = float(mask.sum()) / global_token_count if global_token_count > 0 else 0.0
    return {k: float(v) * weight if weight > 0 else 0.0 for k, v in metrics.items()}


# The policy loss's token statistics under the names the actor logs.
RATIO_METRIC_NAMES = {"pg_clipfrac": "actor/clipfrac", "pg_clipfrac_lower": "actor/clipfrac_lower",
                      "ppo_kl": "actor/approx_kl"}


def ratio_metrics(pg_metrics: Dict[str, torch.Tensor], mask: torch.Tensor, global_token_count: float) -> Dict[str, float]:
    weighted = token_weighted(pg_metrics, mask, global_token_count)
    return {RATIO_METRIC_NAMES.get(k, f"actor/{k}"): v for k, v in weighted.items()}


def expert_masks(mini_batch: DataBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(usual, expert) response masks of a batch with an `is_expert` (B,) 0/1 column (CHORD / SFT rows)."""
    mask = mini_batch.tensors["response_mask"]
    expert = mini_batch.tensors["is_expert"].to(mask.dtype).unsqueeze(-1)
    return mask * (1 - expert), mask * expert


def use_sequence_parallel(model: nn.Module, sequence_parallel: Optional[SequenceParallel]) -> SequenceParallel:
    """The group `model`'s forwards are split over (hooks installed when it has more than one rank)."""
    sequence_parallel = sequence_parallel or SequenceParallel()
    if sequence_parallel.size > 1:
        check_heads_divisible(model.config, sequence_parallel.size)
        install_sequence_parallel(model)
    return sequence_parallel


class ParallelPolicyAgent:
    """`sequence_parallel`: the Ulysses group of this rank (mtrl.models.ulysses); each micro-batch of every
    member of the group is run by the whole group, each rank holding a slice of its sequence."""

    def __init__(self, config: ActorConfig, model: nn.Module, device: torch.device,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 sequence_parallel: Optional[SequenceParallel] = None):
        self.config = config
        self.model = model
        self.device = device
        self.optimizer = optimizer
        self.skipped_updates = SkippedUpdates("actor")
        self.sp = use_sequence_parallel(model, sequence_parallel)
        self.share_prompts = config.share_prompts and self.sp.size == 1 and can_share_prompts(model)
        if self.share_prompts:
            keep_cache_under_checkpointing(model)

    # ------------------------------------------------------------------ forward passes

    def _forward(self, mb: DataBatch, temperature: float, return_entropy: bool = False,
                 return_logits: bool = False, entropy_bonus: bool = False,
                 transform_vision: Optional[Callable[[List[dict], DataBatch], List[dict]]] = None) -> Dict:
        tensors = {k: mb.tensors[k].to(self.device) for k in FORWARD_KEYS if k in mb.tensors}
        vision = mb.non_tensors.get("multi_modal_inputs")
        if vision is not None and transform_vision is not None:
            vision = transform_vision(list(vision), mb)
        vision = None if vision is None else list(vision)
        response_length = mb.tensors["responses"].shape[1]
        outputs = dict(temperature=temperature, return_entropy=return_entropy or entropy_bonus,
                       entropy_grad=entropy_bonus, return_logits=return_logits)
        # A vision transform (the perception pass's) makes every row's images its own: nothing to share.
        shared = self.share_prompts and transform_vision is None
        plan = self._shared_prompt_plan(tensors, vision, response_length) if shared else None
        if plan is not None:
            return forward_shared_prompts(self.model, tensors, vision, response_length, plan, **outputs)
        with self.sp.active():
            return forward_micro_batch(self.model, tensors, vision, response_length=response_length,
                                       padding_free=self.config.padding_free, **outputs)

    def _shared_prompt_plan(self, tensors: Dict[str, torch.Tensor], vision: Optional[List[dict]],
                            response_length: int):
        """The micro-batch's plan, taken only when every rank takes one: FSDP all-gathers at each model call,
        and the shared forward makes two calls where the plain one makes one."""
        plan = shared_prompt_plan(tensors, vision, response_length, self.config.padding_free)
        if dist.is_initialized() and dist.get_world_size() > 1:
            every_rank = torch.tensor(int(plan is not None), device=self.device)
            dist.all_reduce(every_rank, op=dist.ReduceOp.MIN)
            plan = plan if int(every_rank) else None
        return plan

    @torch.no_grad()
    def compute_log_probs(self, batch: DataBatch, temperature: float, return_entropy: bool = False,
                          transform_vision=None) -> Dict[str, torch.Tensor]:
        """Per-token log-probs (and entropy) of the responses, in the batch's row order."""
        self.model.eval()
        outputs: Dict[str, List[torch.Tensor]] = {}
        order: List[int] = []
        for mb, rows in make_micro_batches(batch, self.config.micro_batch_size_per_device_for_experience,
                                           self.config.dynamic_batching, self.config.max_token_len_per_device,
                                           keep_groups=self.share_prompts):
            for member_mb, mine in self.sp.each_member(mb):
                out = self._forward(member_mb, temperature, return_entropy=return_entropy,
                                    transform_vision=transform_vision)
                if mine:
                    for key in ("log_probs", "entropy"):
                        if out.get(key) is not None:
                            outputs.setdefault(key, []).append(out[key].float().cpu())
            order.extend(rows)
        inverse = torch.argsort(torch.tensor(order))
        return {k: torch.cat(v)[inverse] for k, v in outputs.items()}

    @torch.no_grad()
    def compute_exact_dependency(self, batch: DataBatch, temperature: float, transform_vision) -> torch.Tensor:
        """Exact per-token KL(pi(.|I) || pi(.|I')) for the `full_kl` estimator (two forwards per micro-batch)."""
        self.model.eval()
        scores, order = [], []
        for mb, rows in make_micro_batches(batch, self.config.micro_batch_size_per_device_for_experience,
                                           self.config.dynamic_batching, self.config.max_token_len_per_device,
                                           keep_groups=self.share_prompts):
            for member_mb, mine in self.sp.each_member(mb):
                clean = self._forward(member_mb, temperature, return_logits=True)
                perturbed = self._forward(member_mb, temperature, return_logits=True,
                                          transform_vision=transform_vision)
                if mine:
                    mask = member_mb.tensors["response_mask"].to(self.device)
                    scores.append(po.compute_visual_dependency(clean["log_probs"], perturbed["log_probs"], mask,
                                                               estimator="full_kl", logits=clean["logits"],
                                                               aug_logits=perturbed["logits"]).float().cpu())
            order.extend(rows)
        return torch.cat(scores)[torch.argsort(torch.tensor(order))]

    # ------------------------------------------------------------------ update

    def update_policy(self, batch: DataBatch, temperature: float, opt: OptimizationConfig,
                      mini_batch_size: int) -> Dict[str, float]:
        """PPO epochs over mini-batches of `mini_batch_size` rows (this rank's share); one optimizer step each.

        Expects tensors old_log_probs, advantages, response_mask, and optionally token_mask (TPRL
        filter, 1 = receives gradient), ref_log_probs (divergence loss) and rollout_is_weights (rollout
        correction: each token's policy loss is multiplied by its weight).

        Without old_log_probs (and without expert rows) the update is on-policy: it must be one optimizer
        step (one epoch, one mini-batch), so pi_old is the policy being updated and each micro-batch takes
        its own forward's log-probs, detached, as the old ones (`_on_policy_old_log_probs`), and computes
        what the controller computes after an old-log-prob pass: `actor/entropy`, and from the batch's
        rollout_log_probs the rollout correction's weights and metrics.

        Expert rows (CHORD, SFT): with an `is_expert` (B,) column the loss is
        ``(1 - mu) * pg_loss(usual rows) + mu * sft_loss(expert rows)``, mu = ``batch.meta["chord_mu"]``,
        each term normalised by its own rows' global counts in the mini-batch (so micro-batching and the
        split over ranks still do not change the gradient). Expert rows need no old_log_probs/advantages.
        """
        cfg = self.config
        if "old_log_probs" not in batch.tensors and "is_expert" not in batch.tensors and \
                (cfg.ppo_epochs != 1 or len(batch) > mini_batch_size):
            raise ValueError(f"an update without old_log_probs must be one optimizer step (on-policy), got "
                             f"ppo_epochs={cfg.ppo_epochs} and {len(batch)} rows in mini-batches of {mini_batch_size}")
        self.model.train()
        sums: Dict[str, List[float]] = {}

        def record(key: str, value: float) -> None:
            sums.setdefault(key, []).append(float(value))

        for _ in range(cfg.ppo_epochs):
            for mini in batch.split(mini_batch_size):
                if "is_expert" in mini.tensors:
                    norm = dict(zip(("usual", "expert"), _global_counts(list(expert_masks(mini)), self.device)))
                else:
                    norm = global_normalisers(mini, self.device)
                world = dist.get_world_size() if dist.is_initialized() else 1
                mini_metrics: Dict[str, float] = {}
                mini_maxima: Dict[str, float] = {}
                for mb, _ in make_micro_batches(mini, cfg.micro_batch_size_per_device_for_update,
                                                cfg.dynamic_batching, cfg.max_token_len_per_device,
                                                keep_groups=self.share_prompts):
                    for member_mb, _ in self.sp.each_member(mb):
                        loss, micro_metrics = self._micro_batch_loss(member_mb, temperature, opt, norm)
                        # Every rank of a sequence-parallel group holds the member's whole loss: 1/sp each.
                        (loss * world / self.sp.size).backward()
                        for k, v in micro_metrics.items():
                            if k in po.ROLLOUT_MAX_METRICS:
                                mini_maxima[k] = max(mini_maxima.get(k, v), v)
                            else:
                                mini_metrics[k] = mini_metrics.get(k, 0.0) + v / self.sp.size
                record("actor/grad_norm", self.skipped_updates.record(
                    clipped_optimizer_step(self.model, self.optimizer, cfg.max_grad_norm)))
                # Every metric is a micro-batch's share of a global mean (losses by their normalisers, the
                # ratio statistics by tokens): summed over ranks it is the mini-batch's value.
                for k, v in all_reduce_sums(mini_metrics, self.device).items():
                    record(k, v)
                for k, v in all_reduce_sums(mini_maxima, self.device, op=dist.ReduceOp.MAX).items():
                    record(k, v)
        return {**{k: sum(v) / len(v) for k, v in sums.items()}, **self.skipped_updates.metrics()}

    def _micro_batch_loss(self, mb: DataBatch, temperature: float, opt: OptimizationConfig,
                          norm: Dict[str, float]) -> Tuple[torch.Tensor, Dict[str, float]]:
        if "is_expert" in mb.tensors:
            return self._mixed_micro_batch_loss(mb, temperature, opt, norm)
        cfg = self.config
        on_policy = "old_log_probs" not in mb.tensors
        out = self._forward(mb, temperature, return_entropy=on_policy, entropy_bonus=opt.entropy_bonus_coef > 0)
        log_probs = out["log_probs"]
        t = {k: v.to(self.device) for k, v in mb.tensors.items()
             if k in ("old_log_probs", "advantages", "response_mask", "token_mask", "ref_log_probs",
                      "rollout_is_weights", "rollout_log_probs")}
        mask = t["response_mask"]
        old_policy_metrics = self._on_policy_old_log_probs(out, t, opt, norm["global_token_count"]) \
            if on_policy else {}
        pg_loss, pg_metrics = po.get_policy_loss(opt.policy_loss)(
            t["old_log_probs"], log_probs, t["advantages"], mask, cfg.clip_ratio_low, cfg.clip_ratio_high,
            cfg.clip_ratio_dual, loss_agg_mode=cfg.loss_agg_mode, token_mask=t.get("token_mask"), settings=opt,
            rollout_is_weights=t.get("rollout_is_weights"), **norm)
        loss = pg_loss
        metrics = {"actor/pg_loss": pg_loss.item(), **old_policy_metrics,
                   **ratio_metrics(pg_metrics, mask, norm["global_token_count"])}
        loss = loss + self._regularisation(out, t.get("ref_log_probs"), mask, opt, norm, metrics)
        return loss, metrics

    @staticmethod
    def _on_policy_old_log_probs(out: Dict[str, torch.Tensor], t: Dict[str, torch.Tensor], opt: OptimizationConfig,
                                 global_token_count: float) -> Dict[str, float]:
        """One optimizer step per rollout: pi_old is the policy being updated, so the forward's log-probs,
        detached, are exactly the old log-probs (verl's `on_policy`). Writes t["old_log_probs"] (and, with the
        rollout correction on, t["rollout_is_weights"] from them) and returns this micro-batch's share of the
        metrics the controller logs after an old-log-prob pass (`actor/entropy`, `rollout/...`,
        `rollout_corr/...`): token means weighted by tokens, maxima as they are."""
        mask = t["response_mask"]
        t["old_log_probs"] = out["log_probs"].detach()
        means = {"actor/entropy": po.masked_mean(out["entropy"].detach(), mask)}
        maxima = {}
        if po.check_rollout_log_probs(t, opt):
            weights, rollout_metrics = po.rollout_correction(t["old_log_probs"], t["rollout_log_probs"], mask, opt)
            if weights is not None:
                t["rollout_is_weights"] = weights
            for k, v in rollout_metrics.items():
                (maxima if k in po.ROLLOUT_MAX_METRICS else means)[k] = v
        return {**token_weighted(means, mask, global_token_count), **{k: float(v) for k, v in maxima.items()}}

    def _regularisation(self, out: Dict[str, torch.Tensor], ref_log_probs: Optional[torch.Tensor],
                        mask: torch.Tensor, opt: OptimizationConfig, norm: Dict[str, float],
                        metrics: Dict[str, float]) -> torch.Tensor:
        """The optional loss terms added to the policy loss of RL rows: divergence from the reference,
        entropy penalty, entropy bonus (each normalised like the policy loss, logged unscaled)."""
        agg = self.config.loss_agg_mode
        total = out["log_probs"].new_zeros(())
        if opt.use_divergence_loss and not opt.disable_divergence:
            divergence = po.compute_divergence(out["log_probs"], ref_log_probs, opt.divergence_penalty)
            div_loss = po.aggregate_loss(divergence, mask, agg, **norm)
            total = total + opt.divergence_coef * div_loss
            metrics["actor/divergence_loss"] = div_loss.item()
        if opt.use_entropy_penalty:
            ent_loss = po.compute_entropy_penalty(out["log_probs"], mask, loss_agg_mode=agg, **norm)
            total = total + opt.entropy_penalty_coef * ent_loss
            metrics["actor/entropy_loss"] = ent_loss.item()
        if opt.entropy_bonus_coef > 0:
            bonus = po.compute_entropy_bonus(out["entropy"], mask, loss_agg_mode=agg, **norm)
            total = total + opt.entropy_bonus_coef * bonus
            metrics["actor/entropy_bonus_loss"] = bonus.item()
        return total

    def _mixed_micro_batch_loss(self, mb: DataBatch, temperature: float, opt: OptimizationConfig,
                                norm: Dict[str, Dict[str, float]]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """CHORD: ``(1 - mu) * pg_loss(usual rows) + mu * sft_loss(expert rows)``; pure SFT when all rows are expert."""
        cfg = self.config
        mu = float(mb.meta.get("chord_mu", 1.0))
        out = self._forward(mb, temperature, entropy_bonus=opt.entropy_bonus_coef > 0)
        log_probs = out["log_probs"]
        usual_mask, expert_mask = (m.to(self.device) for m in expert_masks(mb))
        loss = log_probs.new_zeros(())
        metrics: Dict[str, float] = {}
        # The branches depend on global counts only, so every rank takes the same ones (and the same
        # metric all-reduces in update_policy).
        if norm["usual"]["global_token_count"] > 0:
            t = {k: v.to(self.device) for k, v in mb.tensors.items()
                 if k in ("old_log_probs", "advantages", "token_mask", "ref_log_probs", "rollout_is_weights")}
            pg_loss, pg_metrics = po.get_policy_loss(opt.policy_loss)(
                t["old_log_probs"], log_probs, t["advantages"], usual_mask, cfg.clip_ratio_low, cfg.clip_ratio_high,
                cfg.clip_ratio_dual, loss_agg_mode=cfg.loss_agg_mode, token_mask=t.get("token_mask"), settings=opt,
                rollout_is_weights=t.get("rollout_is_weights"), **norm["usual"])
            loss = loss + (1.0 - mu) * pg_loss
            metrics.update({"actor/pg_loss": pg_loss.item(), "usual/pg_loss": pg_loss.item(),
                            **ratio_metrics(pg_metrics, usual_mask, norm["usual"]["global_token_count"])})
            loss = loss + self._regularisation(out, t.get("ref_log_probs"), usual_mask, opt, norm["usual"], metrics)
        if norm["expert"]["global_token_count"] > 0:
            sft_loss = po.compute_sft_loss(log_probs, expert_mask, opt.chord.sft_loss_agg_mode,
                                           enable_phi_function=bool(mb.meta.get("chord_phi", False)),
                                           **norm["expert"])
            loss = loss + mu * sft_loss
            metrics["expert/sft_loss"] = sft_loss.item()
        return loss, metrics
