"""The FSDP2 critic (value model) worker, used when the advantage estimator is `gae`."""

from typing import Dict

import torch

from mtrl.agents.optimizer_step import SkippedUpdates, clipped_optimizer_step
from mtrl.agents.parallel_policy_agent import (all_reduce_sums, global_normalisers, make_micro_batches,
                                               token_weighted, use_sequence_parallel)
from mtrl.models.packing import forward_micro_batch
from mtrl.models.ulysses import SequenceParallel
from mtrl.optimization import policy_optimization as po
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, register
from mtrl.utils import checkpoint
from mtrl.workers import fsdp_utils
from mtrl.workers.fsdp_worker import FSDPWorker


class CriticWorker(FSDPWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, total_training_steps: int = 1) -> None:
        cfg = self.config.worker.critic
        self.setup_process()  # no tokenizer: the critic reads token ids only
        # model_path: the critic's own or (filled in on the driver) the policy's.
        self.model = self.build_model(cfg.model.model_path, cfg, trainable=True, head="value")
        # The actor's Ulysses size: one (dp, sp) layout for every model of the worker group.
        self.sp = use_sequence_parallel(self.model, SequenceParallel.create(self.config.worker.actor.ulysses_size))
        self.optimizer = fsdp_utils.build_optimizer(self.model, cfg.optim)
        self.skipped_updates = SkippedUpdates("critic")
        self.lr_scheduler = fsdp_utils.build_lr_scheduler(self.optimizer, cfg.optim, total_training_steps)
        if cfg.offload.offload_params:
            self.model.to("cpu")

    def _resident(self, with_optimizer: bool = False):
        offload = self.config.worker.critic.offload
        return fsdp_utils.resident(self.device, self.model, offload.offload_params,
                                   self.optimizer if with_optimizer else None, offload.offload_optimizer)

    def _values(self, mb: DataBatch) -> torch.Tensor:
        tensors = {k: mb.tensors[k].to(self.device)
                   for k in ("input_ids", "attention_mask", "position_ids", "responses") if k in mb.tensors}
        vision = mb.non_tensors.get("multi_modal_inputs")
        with self.sp.active():
            out = forward_micro_batch(self.model, tensors, None if vision is None else list(vision),
                                      response_length=mb.tensors["responses"].shape[1],
                                      padding_free=self.config.worker.critic.padding_free, value_head=True)
        return out["values"]

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def compute_values(self, batch: DataBatch) -> DataBatch:
        with self._resident():
            return self._compute_values(batch)

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def update_critic(self, batch: DataBatch) -> Dict[str, float]:
        with self._resident(with_optimizer=True):
            return self._update_critic(batch)

    @torch.no_grad()
    def _compute_values(self, batch: DataBatch) -> DataBatch:
        cfg = self.config.worker.critic
        self.model.eval()
        values, order = [], []
        for mb, rows in make_micro_batches(batch, cfg.micro_batch_size_per_device_for_experience,
                                           cfg.dynamic_batching, cfg.max_token_len_per_device):
            for member_mb, mine in self.sp.each_member(mb):
                member_values = self._values(member_mb)
                if mine:
                    values.append(member_values.float().cpu() * mb.tensors["response_mask"])
            order.extend(rows)
        return DataBatch(tensors={"values": torch.cat(values)[torch.argsort(torch.tensor(order))]})

    def _update_critic(self, batch: DataBatch) -> Dict[str, float]:
        """Clipped value loss over PPO epochs and mini-batches, normalised like the actor's loss."""
        cfg = self.config.worker.critic
        self.model.train()
        n = batch.meta.get("n", self.config.worker.rollout.n)
        mini_batch_size = max(1, cfg.global_batch_size * n // self.world_size)
        history: Dict[str, list] = {}
        for _ in range(cfg.ppo_epochs):
            for mini in batch.split(mini_batch_size):
                norm = global_normalisers(mini, self.device)
                # Each micro-batch's share of the mini-batch's global loss / clip fraction (summed over ranks below).
                sums = {"critic/vf_loss": 0.0, "critic/vf_clipfrac": 0.0}
                for mb, _ in make_micro_batches(mini, cfg.micro_batch_size_per_device_for_update,
                                                cfg.dynamic_batching, cfg.max_token_len_per_device):
                    for member_mb, _ in self.sp.each_member(mb):
                        t = {k: member_mb.tensors[k].to(self.device) for k in ("values", "returns", "response_mask")}
                        loss, frac = po.compute_value_loss(self._values(member_mb), t["returns"], t["values"],
                                                           t["response_mask"], cfg.cliprange_value,
                                                           cfg.loss_agg_mode, **norm)
                        # Every rank of a sequence-parallel group holds the member's whole loss: 1/sp each.
                        (loss * self.world_size / self.sp.size).backward()
                        sums["critic/vf_loss"] += loss.item() / self.sp.size
                        sums["critic/vf_clipfrac"] += token_weighted({"f": frac}, t["response_mask"],
                                                                     norm["global_token_count"])["f"] / self.sp.size
                grad_norm = self.skipped_updates.record(clipped_optimizer_step(self.model, self.optimizer,
                                                                               cfg.max_grad_norm))
                for k, v in all_reduce_sums(sums, self.device).items():
                    history.setdefault(k, []).append(v)
                history.setdefault("critic/grad_norm", []).append(grad_norm)
        self.lr_scheduler.step()
        metrics = {**{k: sum(v) / len(v) for k, v in history.items()}, **self.skipped_updates.metrics()}
        metrics["critic/lr"] = self.lr_scheduler.get_last_lr()[0]
        return metrics

    # ------------------------------------------------------------------ checkpoints (mtrl.utils.checkpoint)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        """Sharded value model + optimizer (DCP), LR scheduler and RNG per rank."""
        with self._resident(with_optimizer=True):
            checkpoint.save_fsdp_state(path, self.model, self.optimizer, self.lr_scheduler,
                                       hf_artifacts=[self.model.config])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        with self._resident(with_optimizer=True):
            checkpoint.load_fsdp_state(path, self.model, self.optimizer, self.lr_scheduler)
