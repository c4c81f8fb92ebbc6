"""CHORD: RL with an SFT loss on expert rows mixed into every update (SPEC section 6; arXiv 2508.11408).

`optimization.chord.enable: true` in an RL run (or `rl` stage). Each step runs the usual RL pipeline
(generate, rewards, log-probs, advantages, TPRL, critic) on the rollout rows, then the actor update
gets, in every mini-batch, extra rows from `dataset.sft_files`:

* e expert rows per mini-batch of M rollout rows, with e / (M + e) = `expert_data_ratio`
  (e = round(M r / (1 - r)), rounded to a positive multiple of the worker count so every mini-batch
  splits evenly over the ranks); expert rows are drawn without replacement with a generator seeded by
  (dataset.seed, step), so a resumed run draws the same rows;
* loss = (1 - mu) * pg_loss(rollout rows) + mu * sft_loss(expert rows), each term normalised over
  its own rows of the whole mini-batch (all ranks), mu = `compute_chord_mu(global_step, ...)`
  (warmup / peak / cosine decay / valley); CHORD-phi (`enable_phi_function`) weights each expert
  token's NLL by sg(p (1 - p)).

Metrics: `mu`, `expert/sft_loss`, `usual/pg_loss` (plus the usual actor metrics on the rollout rows).
"""

from typing import Dict, List, Optional

import numpy as np
import torch

from mtrl.optimization import policy_optimization as po
from mtrl.protocol import DataBatch
from mtrl.training.distributed_trainer import DistributedTrainer, mean_over_ranks
from mtrl.training.training_config import MTRLConfig
from mtrl.utils.sft_dataset import build_sft_dataset, pad_sequences

# Tensors the actor update reads; per-response-token ones are padded with zeros when widths differ.
UPDATE_TENSORS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")
RESPONSE_TENSORS = ("old_log_probs", "advantages", "token_mask", "ref_log_probs", "rollout_is_weights")


def expert_rows_per_mini_batch(rollout_rows: int, ratio: float, world_size: int) -> int:
    """e with e / (rollout_rows + e) ~= ratio, a positive multiple of world_size."""
    wanted = rollout_rows * ratio / (1.0 - ratio)
    return max(1, int(round(wanted / world_size))) * world_size


def mix_expert_rows(batch: DataBatch, expert: DataBatch, mini_batches: int, pad_token_id: int) -> DataBatch:
    """The update batch: each mini-batch's rollout rows followed by its equal share of the expert rows
    (mini-batch k = rollout rows k*M ... and expert rows k*E ...), in the batch's own order; the
    controller's dispatch order then splits every mini-batch over the ranks. Expert rows get zero old
    log-probs / advantages and `is_expert` = 1."""
    keys = [k for k in UPDATE_TENSORS + RESPONSE_TENSORS if k in batch.tensors]
    usual = DataBatch({k: batch.tensors[k] for k in keys},
                      {"multi_modal_inputs": batch.non_tensors["multi_modal_inputs"]})
    usual.tensors["is_expert"] = torch.zeros(len(usual), dtype=torch.float32)
    ex_tensors = {k: expert.tensors[k] for k in UPDATE_TENSORS}
    for k in RESPONSE_TENSORS:
        if k in keys:
            fill = torch.ones if k == "token_mask" else torch.zeros
            ex_tensors[k] = fill(expert.tensors["responses"].shape, dtype=batch.tensors[k].dtype)
    ex_tensors["is_expert"] = torch.ones(len(expert), dtype=torch.float32)
    expert = DataBatch(ex_tensors, {"multi_modal_inputs": expert.non_tensors["multi_modal_inputs"]})
    p = max(usual.tensors["prompts"].shape[1], expert.tensors["prompts"].shape[1])
    r = max(usual.tensors["responses"].shape[1], expert.tensors["responses"].shape[1])
    usual = pad_sequences(usual, p, r, pad_token_id, RESPONSE_TENSORS)
    expert = pad_sequences(expert, p, r, pad_token_id, RESPONSE_TENSORS)
    u_per, e_per = len(usual) // mini_batches, len(expert) // mini_batches
    if u_per * mini_batches != len(usual) or e_per * mini_batches != len(expert):
        raise ValueError(f"cannot split {len(usual)} rollout rows and {len(expert)} expert rows evenly over "
                         f"{mini_batches} mini-batches")
    order: List[int] = []
    for k in range(mini_batches):
        order.extend(range(k * u_per, (k + 1) * u_per))
        order.extend(range(len(usual) + k * e_per, len(usual) + (k + 1) * e_per))
    return DataBatch.concat([usual, expert]).index(order)


class ChordTrainer(DistributedTrainer):
    def __init__(self, config: MTRLConfig, export_dir: Optional[str] = None):
        super().__init__(config, export_dir)
        self.expert_set = build_sft_dataset(config.dataset.sft_files, config.dataset, self.tokenizer, self.processor,
                                            self.model_config)

    def chord_mu(self, step: Optional[int] = None) -> float:
        ch = self.config.optimization.chord
        return po.compute_chord_mu(self.global_step if step is None else step, ch.mu_warmup_steps, ch.mu_decay_steps,
                                   ch.mu_peak, ch.mu_valley)

    def _expert_batch(self, count: int) -> DataBatch:
        n = len(self.expert_set)
        rng = np.random.default_rng([self.config.dataset.seed, 104729, self.global_step])
        picks = rng.choice(n, size=count, replace=count > n)
        return self.expert_set.collate([self.expert_set[int(i)] for i in picks])

    def _update_actor(self, batch: DataBatch, order=None) -> Dict[str, float]:
        ch, world = self.config.optimization.chord, self.config.training.world_size
        rows_per_mini = self.config.worker.actor.global_batch_size * batch.meta.get("n", self.config.worker.rollout.n)
        mini_batches = max(1, len(batch) // rows_per_mini)
        per_mini = expert_rows_per_mini_batch(rows_per_mini, ch.expert_data_ratio, world)
        with self._timer("expert_data"):
            expert = self._expert_batch(per_mini * mini_batches)
            update = mix_expert_rows(batch, expert, mini_batches, self.tokenizer.pad_token_id or 0)
        mu = self.chord_mu()
        update.meta.update(batch.meta)
        update.meta.update(chord_mu=mu, chord_phi=ch.enable_phi_function,
                           samples_per_mini_batch=len(update) // mini_batches)
        # The rollout rows' own order is not used: the mixed batch gets the dispatch order of its mini-batches.
        update_order = self._rank_order(update, len(update) // mini_batches)
        metrics = mean_over_ranks(self._dp(self.actor_wg.update_actor, update, update_order))
        metrics.update({"mu": mu, "expert/rows": float(len(expert)), "expert/fraction": len(expert) / len(update)})
        return metrics
