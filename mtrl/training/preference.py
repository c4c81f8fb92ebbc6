"""Preference training: DPO (`training.mode: dpo`) and Bradley-Terry reward models (`training.mode: reward_model`).

Data: `dataset.preference_files` (pairs {prompt, chosen, rejected, [images], [margin]}; several files
mix per `dataset.mix_strategy`), held-out pairs in `dataset.preference_val_files`. One step takes
`dataset.rollout_batch_size` pairs; every `worker.actor.global_batch_size` pairs are one optimizer
step, in micro-batches of `micro_batch_size_per_device_for_update` pairs per worker.

* DPO: the policy starts from `worker.actor.model.model_path`, a frozen copy of it is the reference;
  loss `optimization.dpo` (sigmoid / hinge / ipo, beta, label_smoothing; `compute_dpo_loss`).
  Metrics `dpo/loss`, `dpo/accuracy` (implicit reward of chosen > rejected), `dpo/margin`,
  `dpo/chosen`, `dpo/rejected` (implicit rewards beta * (log pi - log ref)).
* Reward model: the policy architecture with a scalar head read at the last response token
  (`ValueHeadModel`), loss -log sigmoid(r_chosen - r_rejected - margin) with margin =
  `optimization.reward_model.margin` + the row's `margin` (when it has one). Metrics
  `reward_model/loss`, `reward_model/accuracy`, `reward_model/margin`, `reward_model/chosen`, `reward_model/rejected`.

Validation (every `training.val_freq` steps, before training with `val_before_train`, and at the end) on
the held-out pairs: `val/loss`, `val/accuracy` (pairs ranked correctly), `val/margin`. At the end the
model is written as a Hugging Face folder (`export_dir`; `{run_dir}/huggingface` for a single run);
a reward model folder is what `worker.reward.reward_model_path` takes.

Checkpoints and resume as for RL (mtrl/training/checkpointing.py): every `training.save_freq` steps and at
the end, the policy or reward model with its optimizer under `actor/`; a stopped run or stage continues
from its last checkpoint (`training.find_last_checkpoint`).
"""

import time
from typing import Any, Dict, Optional

from mtrl.protocol import DataBatch
from mtrl.training.distributed_trainer import mean_over_ranks
from mtrl.training.trainer_base import Trainer, uses_gpu
from mtrl.training.training_config import MTRLConfig
from mtrl.utils.data_mixing import build_mixed_dataset
from mtrl.utils.dataset import build_dataloader
from mtrl.utils.logger import get_logger
from mtrl.utils.sft_dataset import build_preference_dataset

logger = get_logger(__name__)


class PreferenceTrainer(Trainer):
    def __init__(self, config: MTRLConfig, export_dir: Optional[str] = None):
        self.mode = config.training.mode
        super().__init__(config, export_dir)
        self.worker_group = None

    def _pairs(self, files: str):
        d = self.config.dataset
        return build_preference_dataset(files, d, self.tokenizer, self.processor, self.model_config,
                                        self.config.optimization.reward_model.margin_key)

    def build_train_loader(self):
        d = self.config.dataset
        train_set = build_mixed_dataset(d.preference_files, self._pairs, d.mix_strategy, d.file_weights, d.seed)
        logger.info(f"{self.mode}: {len(train_set)} preference pairs from {d.preference_files}")
        return self.train_dataloader(train_set)

    def build_val_loader(self):
        d = self.config.dataset
        if not d.preference_val_files:
            return None
        return build_dataloader(self._pairs(d.preference_val_files), d.val_batch_size, shuffle=False, seed=d.seed)

    def init_workers(self) -> None:
        from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
        from mtrl.training.worker_run_config import build_worker_run_config
        from mtrl.workers.preference_worker import PreferenceWorker

        t = self.config.training
        self.pool = RayResourcePool([t.n_gpus_per_node] * t.nnodes, use_gpu=uses_gpu(t))
        self.worker_group = RayWorkerGroup(self.pool, RayClassWithInitArgs(
            PreferenceWorker, build_worker_run_config(self.config), self.mode))
        self.worker_group.init_model(max(1, self.total_steps))

    def worker_groups(self) -> Dict[str, Any]:
        return {"actor": self.worker_group}

    def shutdown_workers(self) -> None:
        if self.worker_group is not None:
            self.worker_group.shutdown()

    def _pad_pairs(self, batch: DataBatch) -> DataBatch:
        """Whole pairs repeated at the end so every rank gets the same number of pairs."""
        world = self.config.training.world_size
        pairs = len(batch) // 2
        pad = -pairs % world
        if not pad:
            return batch
        rows = [r for i in range(pad) for r in (2 * (i % pairs), 2 * (i % pairs) + 1)]
        return DataBatch.concat([batch, batch.index(rows)])

    def train_step(self, batch: DataBatch) -> Dict[str, float]:
        start = time.perf_counter()
        # Rows are chosen / rejected pairs: the layout keeps each pair on one rank.
        order = self._rank_order(batch, 2 * self.config.worker.actor.global_batch_size, group_size=2)
        metrics = mean_over_ranks(self._dp(self.worker_group.update, batch, order))
        metrics["perf/step_seconds"] = time.perf_counter() - start
        return metrics

    def validate(self) -> Dict[str, float]:
        start = time.perf_counter()
        parts = []
        for batch in self.val_loader:
            pairs = len(batch) // 2
            parts.append(self.worker_group.evaluate(self._pad_pairs(batch)).index(slice(0, pairs)))
        stats = DataBatch.concat(parts).tensors
        chosen, rejected = stats["chosen"], stats["rejected"]
        return {"val/loss": float(stats["loss"].mean()), "val/accuracy": float((chosen > rejected).float().mean()),
                "val/margin": float((chosen - rejected).mean()), "val/pairs": float(len(chosen)),
                "timing/validation": time.perf_counter() - start}
