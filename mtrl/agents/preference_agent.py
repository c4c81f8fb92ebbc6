"""The data-parallel preference agent: DPO and Bradley-Terry reward-model updates on one rank's pairs.

Batches come from `PreferenceDataset.collate` (mtrl/utils/sft_dataset.py): rows interleaved
``chosen_0, rejected_0, chosen_1, rejected_1, ...`` in the post-generation layout, so a pair never
straddles a micro-batch or a rank as long as every split has an even number of rows (the controller
hands every rank the same number of pairs).

As in `ParallelPolicyAgent`, each micro-batch loss is the sum of its pair losses divided by the number
of pairs in the whole mini-batch over all ranks, times the world size (FSDP averages gradients), so
micro-batch sizes and the worker count do not change the step.

Reward-model scores are read at the last token of each response (`last_token_scores`): the value head
of a `ValueHeadModel` on the hidden state of that token.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtrl.agents.optimizer_step import SkippedUpdates, clipped_optimizer_step
from mtrl.agents.parallel_policy_agent import all_reduce_sums
from mtrl.config.worker import ActorConfig
from mtrl.models.packing import forward_micro_batch
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch

FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "responses")


def with_scoring_token(tensors: Dict[str, torch.Tensor], pad_token_id: int = 0) -> Tuple[Dict[str, torch.Tensor],
                                                                                         torch.Tensor]:
    """Append one token after each row's last response token so that a value-head forward, which returns the
    value of the position *predicting* each response token, returns the value of the last real token itself.

    Returns the widened tensors (response length R + 1; the extra token is `pad_token_id`, marked valid, its
    position ids one past the last token's) and, per row, the response column whose value is the score.
    """
    input_ids, attention_mask = tensors["input_ids"], tensors["attention_mask"]
    response_mask = tensors["response_mask"]
    batch, length = input_ids.shape
    r = response_mask.shape[1]
    p = length - r
    k = response_mask.sum(-1).long()  # responses are right-padded: valid columns 0 .. k-1
    rows = torch.arange(batch, device=input_ids.device)
    col = p + k
    ids = F.pad(input_ids, (0, 1), value=pad_token_id)
    mask = F.pad(attention_mask, (0, 1), value=0)
    ids[rows, col] = pad_token_id
    mask[rows, col] = 1
    out = {"input_ids": ids, "attention_mask": mask, "responses": ids[:, p:], "response_mask": F.pad(response_mask, (0, 1))}
    if "position_ids" in tensors:
        pos = F.pad(tensors["position_ids"], (0, 1), value=0)
        if pos.dim() == 2:
            pos[rows, col] = pos[rows, col - 1] + 1
        else:
            pos[rows, :, col] = pos[rows, :, col - 1] + 1
        out["position_ids"] = pos
    return out, k


def last_token_scores(model: nn.Module, mb: DataBatch, device: torch.device, padding_free: bool = True,
                      pad_token_id: int = 0) -> torch.Tensor:
    """(B,) scalar-head scores of each row at its last response token (the end-of-turn token)."""
    tensors = {k: mb.tensors[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "response_mask")
               if k in mb.tensors}
    widened, columns = with_scoring_token(tensors, pad_token_id)
    vision = mb.non_tensors.get("multi_modal_inputs")
    out = forward_micro_batch(model, widened, None if vision is None else list(vision),
                              response_length=widened["responses"].shape[1], padding_free=padding_free,
                              value_head=True)
    return out["values"][torch.arange(len(columns), device=device), columns]


class PreferenceAgent:
    """`mode`: "dpo" (policy `model` + frozen `ref_model`) or "reward_model" (a `ValueHeadModel`)."""

    def __init__(self, mode: str, config: ActorConfig, opt: OptimizationConfig, model: nn.Module,
                 device: torch.device, optimizer: Optional[torch.optim.Optimizer] = None,
                 ref_model: Optional[nn.Module] = None, pad_token_id: int = 0):
        if mode not in ("dpo", "reward_model"):
            raise ValueError(f"unknown preference mode {mode!r}")
        self.mode, self.config, self.opt = mode, config, opt
        self.model, self.ref_model, self.device, self.optimizer = model, ref_model, device, optimizer
        self.pad_token_id = pad_token_id
        self.skipped_updates = SkippedUpdates(self._metric_names()[0])

    # ------------------------------------------------------------------ per-row scores

    def _row_scores(self, model: nn.Module, mb: DataBatch) -> torch.Tensor:
        """(B,) sequence log-prob (DPO; per-token mean for IPO) or reward score of every row."""
        if self.mode == "reward_model":
            return last_token_scores(model, mb, self.device, self.config.padding_free, self.pad_token_id)
        tensors = {k: mb.tensors[k].to(self.device) for k in FORWARD_KEYS if k in mb.tensors}
        vision = mb.non_tensors.get("multi_modal_inputs")
        out = forward_micro_batch(model, tensors, None if vision is None else list(vision),
                                  response_length=mb.tensors["responses"].shape[1], temperature=1.0,
                                  padding_free=self.config.padding_free)
        mask = mb.tensors["response_mask"].to(self.device)
        return po.sequence_log_probs(out["log_probs"], mask, average=self.opt.dpo.loss_type == "ipo")

    @torch.no_grad()
    def reference_scores(self, batch: DataBatch) -> torch.Tensor:
        """(B,) reference sequence log-probs of every row (DPO)."""
        self.ref_model.eval()
        size = 2 * self.config.micro_batch_size_per_device_for_experience
        return torch.cat([self._row_scores(self.ref_model, mb).float().cpu() for mb in batch.split(size)])

    # ------------------------------------------------------------------ losses

    def _pair_losses(self, mb: DataBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        scores = self._row_scores(self.model, mb)
        chosen, rejected = scores[0::2], scores[1::2]
        if self.mode == "reward_model":
            margin = self.opt.reward_model.margin + mb.tensors["pair_margin"][0::2].to(self.device)
            losses = po.compute_bradley_terry_loss(chosen, rejected, margin)
            return losses, {"chosen": chosen.detach(), "rejected": rejected.detach()}
        ref = mb.tensors["ref_scores"].to(self.device)
        d = self.opt.dpo
        losses, chosen_rewards, rejected_rewards = po.compute_dpo_loss(
            chosen, rejected, ref[0::2], ref[1::2], beta=d.beta, loss_type=d.loss_type,
            label_smoothing=d.label_smoothing)
        return losses, {"chosen": chosen_rewards, "rejected": rejected_rewards}

    def _metric_names(self) -> Tuple[str, str]:
        return ("reward_model", "score") if self.mode == "reward_model" else ("dpo", "reward")

    def update(self, batch: DataBatch, mini_batch_pairs: int) -> Dict[str, float]:
        """One optimizer step per mini-batch of `mini_batch_pairs` pairs (this rank's share)."""
        cfg = self.config
        if self.mode == "dpo" and "ref_scores" not in batch.tensors:
            batch.tensors["ref_scores"] = self.reference_scores(batch)
        self.model.train()
        world = dist.get_world_size() if dist.is_initialized() else 1
        micro_rows = 2 * cfg.micro_batch_size_per_device_for_update
        prefix, _ = self._metric_names()
        history: Dict[str, List[float]] = {}
        for _ in range(cfg.ppo_epochs):
            for mini in batch.split(2 * mini_batch_pairs):
                pairs_global = all_reduce_sums({"pairs": len(mini) // 2}, self.device)["pairs"]
                sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, accuracy, margin, chosen, rejected
                for mb in mini.split(micro_rows):
                    losses, stats = self._pair_losses(mb)
                    (losses.sum() / pairs_global * world).backward()
                    c, r = stats["chosen"].float(), stats["rejected"].float()
                    sums = [a + float(b) for a, b in zip(sums, (losses.detach().sum(), (c > r).float().sum(),
                                                                (c - r).sum(), c.sum(), r.sum()))]
                grad_norm = self.skipped_updates.record(clipped_optimizer_step(self.model, self.optimizer,
                                                                               cfg.max_grad_norm))
                totals = all_reduce_sums(dict(enumerate(sums)), self.device)
                loss, acc, margin, chosen, rejected = [totals[i] / pairs_global for i in range(len(sums))]
                for key, value in (("loss", loss), ("accuracy", acc), ("margin", margin), ("chosen", chosen),
                                   ("rejected", rejected), ("grad_norm", grad_norm)):
                    history.setdefault(f"{prefix}/{key}", []).append(value)
        return {**{k: sum(v) / len(v) for k, v in history.items()}, **self.skipped_updates.metrics()}

    @torch.no_grad()
    def evaluate(self, batch: DataBatch) -> DataBatch:
        """Per pair: chosen / rejected score (DPO: implicit rewards) and loss, as a DataBatch of pairs."""
        self.model.eval()
        if self.mode == "dpo" and "ref_scores" not in batch.tensors:
            batch.tensors["ref_scores"] = self.reference_scores(batch)
        out: Dict[str, List[torch.Tensor]] = {"chosen": [], "rejected": [], "loss": []}
        for mb in batch.split(2 * self.config.micro_batch_size_per_device_for_experience):
            losses, stats = self._pair_losses(mb)
            out["loss"].append(losses.float().cpu())
            out["chosen"].append(stats["chosen"].float().cpu())
            out["rejected"].append(stats["rejected"].float().cpu())
        return DataBatch(tensors={k: torch.cat(v) for k, v in out.items()})
