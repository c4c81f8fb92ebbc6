"""Supervised fine-tuning (`training.mode: sft`, e.g. an SFT warmup stage before RL).

The SFT trainer is the RL trainer with another data source and update step: the same FSDP2 actor
workers on the same Ray runtime (`ActorRolloutRefWorker.update_actor`, no reference model, no
critic, no rollout during training), the same loop (`Trainer.fit`, trainer_base.py: step counting,
validation every `val_freq` steps by generating on `dataset.val_files` and scoring with the reward
function when one is configured, checkpoints, export at the end, metrics).

One step takes `dataset.rollout_batch_size` rows of `dataset.sft_files` (mtrl/utils/sft_dataset.py);
every `worker.actor.global_batch_size` rows are one optimizer step. The loss is the negative
log-likelihood of the response tokens only (`compute_sft_loss`, aggregated by
`optimization.chord.sft_loss_agg_mode`, token-mean by default). The rows go through the agent's
expert-row path (`ParallelPolicyAgent._mixed_micro_batch_loss` with mu = 1): the loss of each
micro-batch is normalised by the token count of the whole mini-batch over all ranks, so micro-batch
sizes and the number of workers do not change the gradient. Log-probs use temperature 1.

Metrics: `expert/sft_loss` (mean NLL per response token), `actor/grad_norm`, `actor/lr`, throughput,
lengths, and `val/*` from validation.
"""

import time
from typing import Dict

from mtrl.protocol import DataBatch
from mtrl.training.distributed_trainer import DistributedTrainer, length_metrics, mean_over_ranks, throughput_metrics
from mtrl.training.training_config import MTRLConfig
from mtrl.utils.data_mixing import build_mixed_dataset
from mtrl.utils.logger import get_logger
from mtrl.utils.sft_dataset import build_sft_dataset
from mtrl.workers.reward import RewardManager

logger = get_logger(__name__)


class NoRewards:
    """Stands in for the reward manager of a run without a reward function (SFT without validation)."""

    def compute(self, batch):
        raise RuntimeError("no reward function is configured (worker.reward.reward_fn_path)")

    def shutdown(self) -> None:
        pass


class SFTTrainer(DistributedTrainer):
    @classmethod
    def _uses_reference(cls, config: MTRLConfig) -> bool:
        return False

    @classmethod
    def _uses_critic(cls, config: MTRLConfig) -> bool:
        return False

    def _start_rewards(self) -> None:
        pass  # they score validation only: their actors start when it first runs

    def build_train_loader(self):
        d = self.config.dataset
        dataset = build_mixed_dataset(d.sft_files, lambda files: build_sft_dataset(files, d, self.tokenizer,
                                                                                   self.processor, self.model_config),
                                      d.mix_strategy, d.file_weights, d.seed)
        logger.info(f"SFT data: {len(dataset)} rows from {d.sft_files}")
        return self.train_dataloader(dataset)

    def _build_rewards(self):
        if self.config.worker.reward.reward_fn_path and self.config.worker.reward.reward_type != "model":
            return RewardManager(self.config.worker.reward, self.config.config_dir)
        return NoRewards()

    def validate(self) -> Dict[str, float]:
        if isinstance(self.rewards, NoRewards):
            return {}
        return super().validate()

    def train_step(self, batch: DataBatch) -> Dict[str, float]:
        self.timing = {}
        start = time.perf_counter()
        batch.meta.update(global_step=self.global_step, chord_mu=1.0, chord_phi=False, temperature=1.0, n=1,
                          samples_per_mini_batch=self.config.worker.actor.global_batch_size)
        metrics: Dict[str, float] = {}
        order = self._rank_order(batch, self.config.worker.actor.global_batch_size, metrics=metrics)
        with self._timer("update_actor"):
            metrics.update(mean_over_ranks(self._dp(self.actor_wg.update_actor, batch, order)))
        metrics.update(self.timing)
        metrics.update(throughput_metrics(batch, time.perf_counter() - start, self.config.training.world_size))
        metrics.update(length_metrics(batch))
        return metrics
