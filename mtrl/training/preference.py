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

Checkpoints: not written during preference training (a stage that stops is run again from its start).
"""

import sys
import time
from typing import Dict, Optional


from mtrl.protocol import DataBatch
from mtrl.training.distributed_trainer import mean_over_ranks, open_run, uses_gpu
from mtrl.training.training_config import MTRLConfig, to_plain_dict
from mtrl.utils.data_mixing import build_mixed_dataset
from mtrl.utils.dataset import build_dataloader
from mtrl.utils.sft_dataset import build_preference_dataset
from mtrl.utils.tracking import Tracker


class PreferenceTrainer:
    def __init__(self, config: MTRLConfig, export_dir: Optional[str] = None):
        self.config = config
        self.mode = config.training.mode
        self.export_dir = export_dir
        self.run_dir = config.training.run_dir
        self.tokenizer, self.processor, model_config = open_run(config)
        d = config.dataset
        margin_key = config.optimization.reward_model.margin_key

        def build(files: str):
            return build_preference_dataset(files, d, self.tokenizer, self.processor, model_config, margin_key)

        self.train_loader = None
        if not config.training.val_only:
            train_set = build_mixed_dataset(d.preference_files, build, d.mix_strategy, d.file_weights, d.seed)
            print(f"[mtrl] {self.mode}: {len(train_set)} preference pairs from {d.preference_files}", file=sys.stderr)
            self.train_loader = build_dataloader(train_set, d.rollout_batch_size, shuffle=d.shuffle, seed=d.seed)
        self.val_loader = None
        if d.preference_val_files:
            self.val_loader = build_dataloader(build(d.preference_val_files), d.val_batch_size, shuffle=False,
                                               seed=d.seed)
        steps = len(self.train_loader) * config.training.total_epochs if self.train_loader is not None else 0
        self.total_steps = min(steps, config.training.max_steps) if config.training.max_steps else steps
        self.tracker = Tracker(config.training.logger, config.training.project_name, config.training.experiment_name,
                               self.run_dir, to_plain_dict(config), total_steps=self.total_steps)
        self.global_step = 0
        self.worker_group = None

    def init_workers(self) -> None:
        from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
        from mtrl.training.worker_run_config import build_worker_run_config
        from mtrl.workers.preference_worker import PreferenceWorker

        t = self.config.training
        self.pool = RayResourcePool([t.n_gpus_per_node] * t.nnodes, use_gpu=uses_gpu(t))
        self.worker_group = RayWorkerGroup(self.pool, RayClassWithInitArgs(
            PreferenceWorker, build_worker_run_config(self.config), self.mode))
        self.worker_group.init_model(max(1, self.total_steps))

    def shutdown(self) -> None:
        self.tracker.finish()
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

    def fit(self) -> Dict[str, float]:
        self.init_workers()
        t = self.config.training
        last_val: Dict[str, float] = {}
        if self.val_loader is not None and (t.val_before_train or t.val_only):
            last_val = self.validate()
            self.tracker.log(last_val, step=self.global_step)
        if not t.val_only:
            for epoch in range(t.total_epochs):
                for batch in self.train_loader:
                    if self.global_step >= self.total_steps:
                        break
                    self.global_step += 1
                    start = time.perf_counter()
                    metrics = mean_over_ranks(self.worker_group.update(batch))
                    metrics["perf/step_seconds"] = time.perf_counter() - start
                    metrics["training/epoch"] = epoch
                    last = self.global_step == self.total_steps
                    if self.val_loader is not None and t.val_freq > 0 and (self.global_step % t.val_freq == 0 or last):
                        last_val = self.validate()
                        metrics.update(last_val)
                    self.tracker.log(metrics, step=self.global_step)
            if self.export_dir:
                start = time.perf_counter()
                self.worker_group.export_hf(self.export_dir)
                print(f"[mtrl] exported the model to {self.export_dir} ({time.perf_counter() - start:.1f} s)")
        return last_val

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
