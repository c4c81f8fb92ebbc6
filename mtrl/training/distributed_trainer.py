"""The single-controller training loop.

This process (the driver) owns the data, the rewards, the advantage computation and the TPRL
token/trajectory decisions; Ray actors own the devices and run FSDP2 actor/reference/rollout
(one process per device, hybrid engine) and optionally the critic. One step:

    prompts -> generate n responses -> rewards [-> online filtering] -> old log-probs + entropy
    -> perception pass (TPRL) -> reference log-probs -> values -> advantages, TPRL mask and scaling
    -> critic update -> actor update -> metrics [-> validation]

Decisions that need the whole batch (group baselines, TPRL's batch-wide min/max) are made here,
so results do not depend on the number of workers.
"""

import os
import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import numpy as np
import torch

from mtrl.models import lora
from mtrl.models.loader import load_config as load_model_config
from mtrl.models.loader import load_processor
from mtrl.optimization import policy_optimization as po
from mtrl.protocol import DataBatch
from mtrl.training.training_config import MTRLConfig, TrainingConfig, config_to_yaml, to_plain_dict
from mtrl.utils import checkpoint
from mtrl.utils.builtin_assets import ensure_builtin_assets
from mtrl.utils.paths import absolutize_paths
from mtrl.utils.dataset import build_dataloader, build_dataset
from mtrl.utils.errors import UserError
from mtrl.utils.seqlen_balancing import balance_across_ranks, flatten_partitions, partition_stats
from mtrl.utils.tracking import Tracker
from mtrl.workers.reward import RewardManager, reward_metrics, token_level_scores


def open_run(config: MTRLConfig):
    """Create the run directory with the resolved config; load the tokenizer, processor and model config."""
    os.makedirs(config.training.run_dir, exist_ok=True)
    with open(os.path.join(config.training.run_dir, "config.yaml"), "w") as f:
        f.write(config_to_yaml(config))
    model_cfg = config.worker.actor.model
    tokenizer, processor = load_processor(model_cfg.tokenizer_path or model_cfg.model_path)
    model_config = load_model_config(model_cfg.model_path, trust_remote_code=model_cfg.trust_remote_code)
    return tokenizer, processor, model_config


def uses_gpu(training: TrainingConfig) -> bool:
    return training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available())


class DistributedTrainer:
    def __init__(self, config: MTRLConfig):
        self.config = config
        self.run_dir = config.training.run_dir
        self.tokenizer, self.processor, model_config = open_run(config)
        self.val_loader = None
        if config.dataset.val_files:
            val_set = build_dataset(config.dataset.val_files, config.dataset, self.tokenizer, self.processor,
                                    model_config)
            self.val_loader = build_dataloader(val_set, config.dataset.val_batch_size, shuffle=False,
                                               seed=config.dataset.seed)
        self.train_loader = None
        if not config.training.val_only:
            self.train_loader = self._build_train_loader(model_config)
        self.total_steps = self._total_steps()
        self.rewards = self._build_rewards()
        opt = config.optimization
        self.use_critic = opt.advantage_estimator == "gae" and not config.training.val_only
        self.use_reference = not opt.disable_divergence and not config.training.val_only
        self.divergence = po.build_divergence_controller(opt.divergence_type, opt.divergence_coef,
                                                         opt.divergence_target, opt.divergence_horizon)
        self.entropy_bonus = po.EntropyBonusController(opt.entropy_bonus_type, opt.entropy_bonus_coef,
                                                       opt.entropy_target, opt.entropy_bonus_step)
        self.tracker = Tracker(config.training.logger, config.training.project_name,
                               config.training.experiment_name, self.run_dir, to_plain_dict(config),
                               total_steps=self.total_steps)
        self.global_step = 0
        self.timing: Dict[str, float] = {}

    def _build_train_loader(self, model_config):
        """The prompts of `dataset.train_files` (several files mixed per `dataset.mix_strategy`); SFT / DPO
        trainers (mtrl/training/sft.py, preference.py) override this."""
        from mtrl.utils.data_mixing import build_mixed_dataset

        d = self.config.dataset
        train_set = build_mixed_dataset(d.train_files, lambda files: build_dataset(files, d, self.tokenizer,
                                                                                   self.processor, model_config),
                                        d.mix_strategy, d.file_weights, d.seed)
        return build_dataloader(train_set, d.rollout_batch_size, shuffle=d.shuffle, seed=d.seed)

    def _build_rewards(self):
        """Rule-based rewards (RewardManager) or, with `worker.reward.reward_type=model`, a reward model
        served by its own FSDP2 workers colocated with the actor (mtrl/workers/reward/model.py)."""
        if self.config.worker.reward.reward_type == "model":
            from mtrl.workers.reward.model import ModelRewardManager

            return ModelRewardManager(self.config)
        return RewardManager(self.config.worker.reward, self.config.config_dir)

    def _total_steps(self) -> int:
        if self.train_loader is None:
            return 0
        steps = len(self.train_loader) * self.config.training.total_epochs
        return min(steps, self.config.training.max_steps) if self.config.training.max_steps else steps

    # ------------------------------------------------------------------ workers

    def init_workers(self) -> None:
        from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, \
            create_colocated_worker_cls
        from mtrl.workers.actor.actor_worker import ActorRolloutRefWorker

        t = self.config.training
        use_gpu = uses_gpu(t)
        lora.check_peft_supported(self.config.worker.actor.model, "cuda" if use_gpu else "cpu")
        self.pool = RayResourcePool([t.n_gpus_per_node] * t.nnodes, use_gpu=use_gpu)
        roles = {"actor": RayClassWithInitArgs(ActorRolloutRefWorker, self.config, with_ref=self.use_reference,
                                               with_optimizer=not t.val_only)}
        if self.use_critic:
            from mtrl.workers.critic.critic_worker import CriticWorker
            roles["critic"] = RayClassWithInitArgs(CriticWorker, self.config)
        roles.update(getattr(self.rewards, "worker_roles", dict)())  # reward_type=model: the reward model
        self.worker_group = RayWorkerGroup(self.pool, create_colocated_worker_cls(roles))
        self.groups = self.worker_group.spawn(list(roles))
        if hasattr(self.rewards, "attach"):
            self.rewards.attach(self.groups)
        self.actor_wg = self.groups["actor"]
        self.critic_wg = self.groups.get("critic")
        self.actor_wg.init_model(max(1, self.total_steps))
        if self.critic_wg is not None:
            self.critic_wg.init_model(max(1, self.total_steps))

    def shutdown(self) -> None:
        self.tracker.finish()
        self.rewards.shutdown()
        if getattr(self, "worker_group", None) is not None:
            self.worker_group.shutdown()

    def _dp(self, method, batch: DataBatch) -> DataBatch:
        """Call a data-parallel worker method with rows padded to a multiple of the world size.

        Every rank must run the same number of forward passes under FSDP, so every rank gets the
        same number of rows; the copies added for padding are dropped from the result.
        """
        world = self.config.training.world_size
        pad = -len(batch) % world
        if pad == 0:
            return method(batch)
        padded = DataBatch.concat([batch, batch.index([i % len(batch) for i in range(pad)])])
        out = method(padded)
        # Generation returns n rows per prompt, in prompt order, so the padding is still at the end.
        return out.index(slice(0, len(batch) * (len(out) // len(padded))))

    @contextmanager
    def _timer(self, name: str):
        start = time.perf_counter()
        yield
        self.timing[f"timing/{name}"] = time.perf_counter() - start

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Dict[str, float]:
        self.init_workers()
        checkpoint.resume_from_checkpoint(self)  # training.load_checkpoint_path / find_last_checkpoint
        t = self.config.training
        last_val: Dict[str, float] = {}
        if self.val_loader is not None and (t.val_before_train or t.val_only):
            last_val = self.validate()
            self.tracker.log(last_val, step=self.global_step)
        if t.val_only:
            return last_val
        for epoch in range(self.train_loader.epoch, t.total_epochs):  # a resumed run continues its epoch
            for prompts in self.train_loader:
                if self.global_step >= self.total_steps:
                    break
                self.global_step += 1
                metrics = self.train_step(prompts)
                last_step = self.global_step == self.total_steps
                if self.val_loader is not None and t.val_freq > 0 and (
                        self.global_step % t.val_freq == 0 or last_step):
                    last_val = self.validate()
                    metrics.update(last_val)
                metrics["training/epoch"] = epoch
                if checkpoint.should_save(t.save_freq, self.global_step, last_step):
                    with self._timer("save_checkpoint"):
                        checkpoint.save_checkpoint(self)
                    metrics["timing/save_checkpoint"] = self.timing["timing/save_checkpoint"]
                self.tracker.log(metrics, step=self.global_step)
        return last_val

    def train_step(self, prompts: DataBatch) -> Dict[str, float]:
        opt, rollout = self.config.optimization, self.config.worker.rollout
        self.timing = {}
        step_start = time.perf_counter()
        metrics: Dict[str, float] = {}
        with self._timer("generate"):
            batch = self._generate_with_rewards(prompts, metrics)
        batch.meta.update(global_step=self.global_step, n=rollout.n, temperature=rollout.temperature)
        if self.config.worker.actor.dynamic_batching:
            metrics.update(self._balance_across_ranks(batch))

        with self._timer("old_log_probs"):
            batch.union(self._dp(self.actor_wg.compute_log_probs, batch))
        metrics["actor/entropy"] = float(po.masked_mean(batch.tensors["entropys"], batch.tensors["response_mask"]))
        batch.meta["entropy_bonus_coef"] = metrics["actor/entropy_bonus_coef"] = \
            self.entropy_bonus.coefficient(metrics["actor/entropy"])
        if opt.needs_perception_pass and self._has_images(batch):
            with self._timer("perception"):
                self._perception_pass(batch)
        if self.use_reference:
            with self._timer("ref_log_probs"):
                batch.union(self._dp(self.actor_wg.compute_ref_log_probs, batch))
        if self.use_critic:
            with self._timer("values"):
                batch.union(self._dp(self.critic_wg.compute_values, batch))
        with self._timer("advantages"):
            metrics.update(self._compute_advantages(batch))
            metrics.update({f"actor/{k}": float(v) for k, v in po.apply_tprl(batch.tensors, opt).items()})
        if self.use_critic:
            with self._timer("update_critic"):
                metrics.update(mean_over_ranks(self.critic_wg.update_critic(batch)))
        with self._timer("update_actor"):
            metrics.update(self._update_actor(batch))

        metrics.update(self.timing)
        metrics.update(throughput_metrics(batch, time.perf_counter() - step_start, self.config.training.world_size))
        metrics.update(length_metrics(batch))
        return metrics

    def _update_actor(self, batch: DataBatch) -> Dict[str, float]:
        """The actor update (CHORD mixes expert rows in here: mtrl/training/chord.py)."""
        return mean_over_ranks(self.actor_wg.update_actor(batch))

    # ------------------------------------------------------------------ phases

    def _balance_across_ranks(self, batch: DataBatch) -> Dict[str, float]:
        """Reorder rows so that each rank's contiguous share has a near-equal number of tokens."""
        world = self.config.training.world_size
        if len(batch) % world:
            return {}
        lengths = batch.tensors["attention_mask"].sum(-1).tolist()
        partitions = balance_across_ranks(lengths, world, equal_size=True)
        batch.reorder(flatten_partitions(partitions))
        stats = partition_stats(lengths, partitions)
        return {f"perf/rank_tokens_{k}": float(v) for k, v in stats.items()}

    def _generate_with_rewards(self, prompts: DataBatch, metrics: Dict[str, float]) -> DataBatch:
        """Generate and score; with online filtering, keep only prompt groups whose mean score is in range,
        drawing further prompts (at most `max_filter_tries` generations) until the batch is full."""
        opt = self.config.optimization
        batch = self._generate_and_score(prompts, metrics)
        if not opt.online_filtering:
            return batch
        wanted = len(prompts) * self.config.worker.rollout.n
        kept, tries = [self._filter_groups(batch)], 1
        while sum(len(b) for b in kept) < wanted and tries < opt.max_filter_tries:
            kept.append(self._filter_groups(self._generate_and_score(self._next_prompts(), {})))
            tries += 1
        batch_kept = DataBatch.concat([b for b in kept if len(b)] or [batch])
        granule = self.config.worker.actor.global_batch_size * self.config.worker.rollout.n
        usable = min(wanted, len(batch_kept) // granule * granule)
        metrics["filter/tries"] = tries
        metrics["filter/kept_fraction"] = len(batch_kept) / (wanted * tries)
        if usable == 0:
            print(f"[mtrl] online filtering kept {len(batch_kept)} samples after {tries} tries; "
                  f"training on the unfiltered batch this step", file=sys.stderr)
            return batch
        return batch_kept.index(slice(0, usable))

    def _next_prompts(self) -> DataBatch:
        # The loader's position is shared by its iterators: this continues after the step's own batch.
        return next(iter(self.train_loader))

    def _filter_groups(self, batch: DataBatch) -> DataBatch:
        opt = self.config.optimization
        values = batch.non_tensors.get(f"reward_{opt.filter_key}", batch.tensors["scores"].numpy())
        values = np.asarray(values, dtype=np.float64)
        uids = batch.non_tensors["uid"]
        keep = np.zeros(len(batch), dtype=bool)
        for uid in np.unique(uids):
            rows = uids == uid
            keep[rows] = opt.filter_low <= values[rows].mean() <= opt.filter_high
        return batch.index(keep)

    def _generate_and_score(self, prompts: DataBatch, metrics: Dict[str, float],
                            sampling: Optional[dict] = None, shape_scores: bool = True) -> DataBatch:
        prompts.meta.update(global_step=self.global_step, **(sampling or {}))
        batch = self._dp(self.actor_wg.generate_sequences, prompts)
        n_per_uid: Dict[str, int] = {}
        sample_uids = []
        for uid in batch.non_tensors["uid"]:
            sample_uids.append(f"{uid}/{n_per_uid.get(uid, 0)}")
            n_per_uid[uid] = n_per_uid.get(uid, 0) + 1
        batch.non_tensors["sample_uid"] = np.array(sample_uids, dtype=object)
        batch.non_tensors["response_text"] = np.array(
            self.tokenizer.batch_decode([r[m.bool()] for r, m in zip(batch.tensors["responses"],
                                                                     batch.tensors["response_mask"])],
                                        skip_special_tokens=True), dtype=object)
        scores, per_sample = self.rewards.compute(batch)
        batch.tensors["scores"] = scores
        for name, values in per_sample.items():
            batch.non_tensors[f"reward_{name}"] = np.asarray(values, dtype=object)
        metrics.update(reward_metrics(scores, per_sample))
        opt = self.config.optimization
        if shape_scores and opt.overlong_buffer_length > 0:
            max_length = self.config.worker.rollout.max_new_tokens or self.config.dataset.max_response_length
            penalty = po.overlong_penalty(batch.tensors["response_mask"].sum(-1), max_length,
                                          opt.overlong_buffer_length, opt.overlong_penalty_factor)
            batch.tensors["scores"] = scores + penalty
            metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
        return batch

    @staticmethod
    def _has_images(batch: DataBatch) -> bool:
        vision = batch.non_tensors.get("multi_modal_inputs")
        return vision is not None and any("pixel_values" in (mm or {}) for mm in vision)

    def _perception_pass(self, batch: DataBatch) -> None:
        """The actor's perception pass (perturbed-image log-probs, or exact dependency); po.apply_tprl uses it."""
        batch.union(self._dp(self.actor_wg.compute_perception, batch))

    def _compute_advantages(self, batch: DataBatch) -> Dict[str, float]:
        opt = self.config.optimization
        mask = batch.tensors["response_mask"].float()
        scores = token_level_scores(batch.tensors["scores"], batch.tensors["response_mask"])
        metrics: Dict[str, float] = {}
        if self.use_reference and not opt.use_divergence_loss:
            rewards, divergence = po.apply_divergence_penalty(scores, batch.tensors["old_log_probs"],
                                                              batch.tensors["ref_log_probs"], mask,
                                                              self.divergence.value, opt.divergence_penalty)
            self.divergence.update(float(divergence), len(batch))
            metrics.update({"actor/reward_divergence": float(divergence), "actor/divergence_coef": self.divergence.value})
        else:
            rewards = scores
        batch.tensors["token_level_rewards"] = rewards
        # Everything the estimators take; each uses what its signature names (ReMax's greedy
        # baselines cost a generation, so they are made only for an estimator that takes them).
        inputs = dict(token_level_rewards=rewards, response_mask=mask, index=batch.non_tensors["uid"],
                      gamma=opt.gamma, lam=opt.lam, norm_adv_by_std=opt.norm_adv_by_std_in_grpo)
        if "values" in batch.tensors:
            inputs["values"] = batch.tensors["values"]
        if "reward_baselines" in po.advantage_estimator_inputs(opt.advantage_estimator):
            inputs["reward_baselines"] = self._greedy_baselines(batch)
        adv, ret = po.compute_advantage_return(opt.advantage_estimator, **inputs)
        batch.tensors["advantages"], batch.tensors["returns"] = adv, ret
        metrics["critic/advantages_mean"] = float(po.masked_mean(adv, mask))
        metrics["critic/returns_mean"] = float(po.masked_mean(ret, mask))
        return metrics

    def _greedy_baselines(self, batch: DataBatch) -> torch.Tensor:
        """ReMax baseline: the reward of a greedy response to the same prompt, one per row."""
        first = {}
        for i, uid in enumerate(batch.non_tensors["uid"]):
            first.setdefault(uid, i)
        prompt_rows = self._as_prompts(batch.index(list(first.values())))
        with self._timer("remax_baseline"):
            greedy = self._generate_and_score(prompt_rows, {}, {"n": 1, "temperature": 0.0})
        by_uid = dict(zip(greedy.non_tensors["uid"], greedy.tensors["scores"].tolist()))
        return torch.tensor([by_uid[u] for u in batch.non_tensors["uid"]], dtype=torch.float32)

    def _as_prompts(self, rows: DataBatch) -> DataBatch:
        """Prompt-only view of generated rows (prompt part of input ids, masks and positions)."""
        p = rows.tensors["prompts"].shape[1]
        tensors = {"input_ids": rows.tensors["input_ids"][:, :p], "attention_mask": rows.tensors["attention_mask"][:, :p],
                   "position_ids": rows.tensors["position_ids"][..., :p]}
        keep = [k for k in ("multi_modal_inputs", "raw_prompt", "ground_truth", "images", "uid", "index")
                if k in rows.non_tensors]
        return DataBatch(tensors, {k: rows.non_tensors[k] for k in keep}, {})

    # ------------------------------------------------------------------ validation

    def validate(self) -> Dict[str, float]:
        override = self.config.worker.rollout.val_override
        sampling = {"n": override.n, "temperature": override.temperature, "top_p": override.top_p,
                    "top_k": override.top_k}
        start = time.perf_counter()
        scores, per_sample_all, generations = [], {}, []
        for prompts in self.val_loader:
            batch = self._generate_and_score(prompts, {}, sampling, shape_scores=False)
            scores.append(batch.tensors["scores"])
            for key in batch.non_tensors:
                if key.startswith("reward_"):
                    per_sample_all.setdefault(key[len("reward_"):], []).extend(batch.non_tensors[key].tolist())
            generations.extend({"prompt": p, "response": r, "ground_truth": g, "score": float(s)}
                               for p, r, g, s in zip(batch.non_tensors["raw_prompt"], batch.non_tensors["response_text"],
                                                     batch.non_tensors["ground_truth"], batch.tensors["scores"]))
        all_scores = torch.cat(scores)
        metrics = {"val/reward_score": float(all_scores.mean())}
        metrics.update({f"val/{k.split('/', 1)[1]}": v for k, v in reward_metrics(all_scores, per_sample_all).items()
                        if k != "reward/overall"})
        metrics["timing/validation"] = time.perf_counter() - start
        n_log = self.config.training.val_generations_to_log
        if n_log > 0:
            self.tracker.log_generations(generations[:n_log], step=self.global_step)
        return metrics


# ------------------------------------------------------------------ metric helpers


def mean_over_ranks(per_rank: List[Dict[str, float]]) -> Dict[str, float]:
    keys = per_rank[0].keys()
    return {k: float(np.mean([m[k] for m in per_rank if k in m])) for k in keys}


def throughput_metrics(batch: DataBatch, seconds: float, world_size: int) -> Dict[str, float]:
    tokens = float(batch.tensors["attention_mask"].sum())
    return {"perf/tokens_per_second": tokens / seconds, "perf/samples_per_second": len(batch) / seconds,
            "perf/throughput": tokens / seconds / world_size, "perf/step_seconds": seconds,
            "perf/total_tokens": tokens}


def length_metrics(batch: DataBatch) -> Dict[str, float]:
    lengths = batch.tensors["response_mask"].sum(-1).float()
    max_len = batch.tensors["responses"].shape[1]
    p = batch.tensors["prompts"].shape[1]
    prompt_lengths = batch.tensors["attention_mask"][:, :p].sum(-1).float()
    return {"response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "response_length/clip_ratio": float((lengths >= max_len).float().mean()),
            "prompt_length/mean": float(prompt_lengths.mean())}


# ------------------------------------------------------------------ entry


def run_training(config: MTRLConfig, trainer_cls=None) -> int:
    """Start Ray, train (or validate), shut Ray down (unless it was running already, e.g. between the
    stages of mtrl/training/stages.py). `trainer_cls(config)`: default DistributedTrainer. Returns the exit code."""
    import ray

    from mtrl.single_controller.ray import init_ray

    started_ray = not ray.is_initialized()
    init_ray(num_cpus=max(4, config.training.world_size + config.worker.reward.num_cpus + 1))
    trainer = None
    try:
        ensure_builtin_assets(config)
        absolutize_paths(config)
        trainer = (trainer_cls or DistributedTrainer)(config)
        final = trainer.fit()
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items()) if k.startswith("val/"))
        print(f"[mtrl] done. run directory: {trainer.run_dir} (metrics.jsonl, config.yaml)"
              + (f"; final validation: {summary}" if summary else ""))
        return 0
    except UserError as e:
        print(f"mtrl: error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.shutdown()
        if started_ray:
            ray.shutdown()

