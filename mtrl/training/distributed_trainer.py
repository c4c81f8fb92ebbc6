"""The RL trainer: the steps of the single-controller RL pipeline (the loop itself: trainer_base.py).

This process (the driver) owns the data, the rewards, the advantage computation and the TPRL
token/trajectory decisions; Ray actors own the devices and run FSDP2 actor/reference/rollout
(one process per device, hybrid engine) and optionally the critic. One step:

    prompts -> generate n responses -> rewards [-> online filtering] -> old log-probs + entropy
    -> rollout mismatch metrics [and correction weights] -> perception pass (TPRL) -> reference log-probs
    -> values -> advantages, TPRL mask and scaling
    -> critic update -> actor update -> metrics [-> validation]

The old log-probs + entropy come from the actor's own pass, or from the rollout engine, or (one optimizer step
per rollout and nothing before the update reads them) from the update's forward, which then also computes the
entropy and rollout-correction metrics and weights (`worker.actor.old_log_probs`, `_old_log_prob_source`).

Start-up: `run_training` starts the worker processes from the config (`start_workers`) before this process plans
the memory, loads the tokenizer and builds the datasets; `init_workers` starts the reward actors, waits for the
workers and builds the models.

Decisions that need the whole batch (group baselines, TPRL's batch-wide min/max) are made here,
so results do not depend on the number of workers.
"""

import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mtrl.models import lora
from mtrl.optimization import policy_optimization as po
from mtrl.protocol import DataBatch
from mtrl.training.trainer_base import Trainer, uses_gpu
from mtrl.training.training_config import MTRLConfig
from mtrl.training.worker_run_config import build_worker_run_config
from mtrl.utils.dataset import PROMPT_NON_TENSORS, build_dataloader, build_dataset
from mtrl.utils.errors import UserError
from mtrl.utils.logger import get_logger
from mtrl.workers.actor.perception import patches_per_cell
from mtrl.workers.reward import RewardManager, reward_metrics, token_level_scores

logger = get_logger(__name__)


class DistributedTrainer(Trainer):
    """The RL trainer: the skeleton's loop (trainer_base.py) with generation, rewards and the PPO-style update."""

    def __init__(self, config: MTRLConfig, export_dir: Optional[str] = None):
        super().__init__(config, export_dir)
        opt = config.optimization
        image_processor = getattr(self.processor, "image_processor", None)
        if opt.needs_perception_pass and image_processor is not None:  # fail here, not in a worker's first step
            patches_per_cell(opt.perception_patch_size, image_processor.patch_size)
        self.rewards = self._build_rewards()
        self.use_critic = self._uses_critic(config)
        self.use_reference = self._uses_reference(config)
        self.divergence = po.build_divergence_controller(opt.divergence_type, opt.divergence_coef,
                                                         opt.divergence_target, opt.divergence_horizon)
        self.entropy_bonus = po.EntropyBonusController(opt.entropy_bonus_type, opt.entropy_bonus_coef,
                                                       opt.entropy_target, opt.entropy_bonus_step)
        self.worker_group = None

    @classmethod
    def _uses_critic(cls, config: MTRLConfig) -> bool:
        return config.optimization.advantage_estimator == "gae" and not config.training.val_only

    @classmethod
    def _uses_reference(cls, config: MTRLConfig) -> bool:
        return not config.optimization.disable_divergence and not config.training.val_only

    def _start_rewards(self) -> None:
        """The reward actors' processes start now, alongside the workers' (the first step scores rewards)."""
        if hasattr(self.rewards, "start"):
            self.rewards.start()

    def build_val_loader(self):
        d = self.config.dataset
        if not d.val_files:
            return None
        val_set = build_dataset(d.val_files, d, self.tokenizer, self.processor, self.model_config)
        return build_dataloader(val_set, d.val_batch_size, shuffle=False, seed=d.seed)

    def build_train_loader(self):
        """The prompts of `dataset.train_files` (several files mixed per `dataset.mix_strategy`); SFT
        (mtrl/training/sft.py) overrides this."""
        from mtrl.utils.data_mixing import build_mixed_dataset

        d = self.config.dataset
        train_set = build_mixed_dataset(d.train_files, lambda files: build_dataset(files, d, self.tokenizer,
                                                                                   self.processor, self.model_config),
                                        d.mix_strategy, d.file_weights, d.seed)
        return self.train_dataloader(train_set)

    def _build_rewards(self):
        """Rule-based rewards (RewardManager) or, with `worker.reward.reward_type=model`, a reward model
        served by its own FSDP2 workers colocated with the actor (mtrl/workers/reward/model.py)."""
        if self.config.worker.reward.reward_type == "model":
            from mtrl.workers.reward.model import ModelRewardManager

            return ModelRewardManager(build_worker_run_config(self.config), self.config.training.world_size,
                                      self.config.config_dir)
        return RewardManager(self.config.worker.reward, self.config.config_dir)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["divergence"] = self.divergence.state_dict() if self.divergence is not None else None
        state["entropy_bonus"] = self.entropy_bonus.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.divergence is not None and state.get("divergence"):
            self.divergence.load_state_dict(state["divergence"])
        if state.get("entropy_bonus"):
            self.entropy_bonus.load_state_dict(state["entropy_bonus"])

    # ------------------------------------------------------------------ workers

    @classmethod
    def start_workers(cls, config: MTRLConfig):
        """The worker group started from the config alone (see Trainer.start_workers), or None when it needs the
        trainer: a reward model's roles (reward_type=model), the vLLM engine's media limit read from the datasets,
        an adapter this machine cannot run (init_workers reports it, as without an early start)."""
        w = config.worker
        if w.reward.reward_type == "model" or (w.rollout.name == "vllm" and not w.rollout.limit_mm_per_prompt):
            return None
        try:
            return cls._start_worker_group(config, build_worker_run_config(config))
        except UserError:
            return None

    @classmethod
    def _start_worker_group(cls, config: MTRLConfig, run_config, extra_roles: Optional[Dict[str, Any]] = None):
        """One colocated worker process per device with the actor (and critic, and `extra_roles`) roles, started
        (StartingWorkerGroup: `.result()` is the group)."""
        from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, \
            create_colocated_worker_cls
        from mtrl.workers.actor.actor_worker import ActorRolloutRefWorker

        t = config.training
        use_gpu = uses_gpu(t)
        lora.check_peft_supported(config.worker.actor.model, "cuda" if use_gpu else "cpu")
        roles = {"actor": RayClassWithInitArgs(ActorRolloutRefWorker, run_config,
                                               with_ref=cls._uses_reference(config), with_optimizer=not t.val_only)}
        if cls._uses_critic(config):
            from mtrl.workers.critic.critic_worker import CriticWorker
            roles["critic"] = RayClassWithInitArgs(CriticWorker, run_config)
        roles.update(extra_roles or {})
        pool = RayResourcePool([t.n_gpus_per_node] * t.nnodes, use_gpu=use_gpu)
        return RayWorkerGroup.start(pool, create_colocated_worker_cls(roles))

    def init_workers(self) -> None:
        self._start_rewards()
        starting, self.starting_workers = self.starting_workers, None
        if starting is None:
            run_config = build_worker_run_config(self.config)
            rollout = run_config.worker.rollout
            if rollout.name == "vllm" and not rollout.limit_mm_per_prompt and \
                    getattr(self.model_config, "vision_config", None) is not None:
                rollout.limit_mm_per_prompt = self._media_per_prompt()
            # reward_type=model: the reward model's roles join the actor's
            starting = self._start_worker_group(self.config, run_config, getattr(self.rewards, "worker_roles", dict)())
        self.worker_group = starting.result()
        self.groups = self.worker_group.spawn()
        if hasattr(self.rewards, "attach"):
            self.rewards.attach(self.groups)
        self.actor_wg = self.groups["actor"]
        self.critic_wg = self.groups.get("critic")
        self.actor_wg.init_model(max(1, self.total_steps))
        if self.critic_wg is not None:
            self.critic_wg.init_model(max(1, self.total_steps))

    def _media_per_prompt(self) -> Dict[str, int]:
        """The most images / videos a training or validation row has."""
        loaders = [loader for loader in (self.train_loader, self.val_loader) if loader is not None]
        counts = [loader.dataset.media_per_row() for loader in loaders]
        return {k: max(c[k] for c in counts) for k in ("image", "video")}

    def worker_groups(self) -> Dict[str, Any]:
        groups = {"actor": self.actor_wg}
        if self.critic_wg is not None:
            groups["critic"] = self.critic_wg
        return groups

    def shutdown_workers(self) -> None:
        super().shutdown_workers()
        self.rewards.shutdown()
        if self.worker_group is not None:
            self.worker_group.shutdown()

    # ------------------------------------------------------------------ one step

    def train_step(self, prompts: DataBatch) -> Dict[str, float]:
        opt, rollout = self.config.optimization, self.config.worker.rollout
        self.timing = {}
        step_start = time.perf_counter()
        metrics: Dict[str, float] = {}
        with self._timer("generate"):
            batch = self._generate_with_rewards(prompts, metrics)
        batch.meta.update(global_step=self.global_step, n=rollout.n, temperature=rollout.temperature)
        # One dispatch order for every pass of the step: each rank's rows are its share of every actor
        # update mini-batch (and token-balanced), so neither passes nor update depend on the worker count.
        # With shared-prompt forwards a prompt's responses stay on one rank (rows of a prompt are consecutive).
        actor, world = self.config.worker.actor, self.config.training.world_size
        group = rollout.n if actor.share_prompts and actor.global_batch_size % world == 0 else 1
        order = self._rank_order(batch, actor.global_batch_size * rollout.n, group_size=group, metrics=metrics)

        source = self._old_log_prob_source(batch)
        if source == "recompute":
            with self._timer("old_log_probs"):
                batch.union(self._dp(self.actor_wg.compute_log_probs, batch, order))
        if source == "update":  # the update computes these from its own forward (fixed bonus coefficient)
            batch.meta["entropy_bonus_coef"] = metrics["actor/entropy_bonus_coef"] = self.entropy_bonus.value
        else:
            # The engine's sampled-token log-probs vs the actor's: mismatch metrics and the correction weights.
            metrics.update(po.apply_rollout_correction(batch.tensors, opt))
            metrics["actor/entropy"] = float(po.masked_mean(batch.tensors["entropys"], batch.tensors["response_mask"]))
            batch.meta["entropy_bonus_coef"] = metrics["actor/entropy_bonus_coef"] = \
                self.entropy_bonus.coefficient(metrics["actor/entropy"])
        if opt.needs_perception_pass and self._has_vision(batch):
            with self._timer("perception"):
                self._perception_pass(batch, order)
        if self.use_reference:
            with self._timer("ref_log_probs"):
                batch.union(self._dp(self.actor_wg.compute_ref_log_probs, batch, order))
        if self.use_critic:
            with self._timer("values"):
                batch.union(self._dp(self.critic_wg.compute_values, batch, order))
        with self._timer("advantages"):
            metrics.update(self._compute_advantages(batch))
            metrics.update({f"actor/{k}": float(v) for k, v in po.apply_tprl(batch.tensors, opt).items()})
        if self.use_critic:
            with self._timer("update_critic"):
                critic_batch = self.config.worker.critic.global_batch_size or self.config.worker.actor.global_batch_size
                critic_order = self._rank_order(batch, critic_batch * rollout.n)
                metrics.update(mean_over_ranks(self._dp(self.critic_wg.update_critic, batch, critic_order)))
        with self._timer("update_actor"):
            metrics.update(self._update_actor(batch, order))

        metrics.update(self.timing)
        metrics.update(throughput_metrics(batch, time.perf_counter() - step_start, self.config.training.world_size))
        metrics.update(length_metrics(batch))
        return metrics

    def _old_log_prob_source(self, batch: DataBatch) -> str:
        """Where this step's old log-probs and entropies come from (`worker.actor.old_log_probs`): "recompute"
        (the actor's pass), "rollout" (the engine recorded them) or "update" (auto, when exact: the update is one
        optimizer step and nothing before it reads them; the actor's update then takes its own forward's)."""
        mode = self.config.worker.actor.old_log_probs
        if mode == "rollout" and "old_log_probs" not in batch.tensors:
            raise RuntimeError("worker.actor.old_log_probs=rollout: the rollout engine returned no old_log_probs")
        if mode != "auto":
            return mode
        opt, actor = self.config.optimization, self.config.worker.actor
        one_optimizer_step = actor.ppo_epochs == 1 and len(batch) <= actor.global_batch_size * batch.meta["n"]
        read_before_update = (
            opt.enable_entropy_filtering  # TPRL's entropy filter
            or (opt.needs_perception_pass and opt.dependency_estimator == "sampled_k3" and self._has_vision(batch))
            or (self.use_reference and not opt.use_divergence_loss)  # the KL penalty in the reward
            or opt.entropy_bonus_type == "adaptive"  # this step's coefficient follows this step's entropy
            or opt.chord.enable)  # the mixed update's expert rows have no on-policy path yet
        return "update" if one_optimizer_step and not read_before_update else "recompute"

    def _update_actor(self, batch: DataBatch, order: Optional[List[int]]) -> Dict[str, float]:
        """The actor update, rows dispatched in `order` (CHORD mixes expert rows in here: mtrl/training/chord.py)."""
        return mean_over_ranks(self._dp(self.actor_wg.update_actor, batch, order))

    # ------------------------------------------------------------------ phases

    def _generate_with_rewards(self, prompts: DataBatch, metrics: Dict[str, float]) -> DataBatch:
        """Generate and score; with online filtering, keep only prompt groups whose mean score is in range,
        drawing further prompts (at most `max_filter_tries` generations) until the batch is full."""
        opt = self.config.optimization
        batch = self._generate_and_score(prompts, metrics)
        if not opt.online_filtering:
            return batch
        wanted = len(prompts) * self.config.worker.rollout.n
        kept, tries = [self._filter_groups(batch)], 1
        while sum(len(b) for b in kept) < wanted and tries < opt.max_filter_tries and not self._data_spent():
            kept.append(self._filter_groups(self._generate_and_score(self._next_prompts(), {})))
            tries += 1
        batch_kept = DataBatch.concat([b for b in kept if len(b)] or [batch])
        granule = self.config.worker.actor.global_batch_size * self.config.worker.rollout.n
        usable = min(wanted, len(batch_kept) // granule * granule)
        metrics["filter/tries"] = tries
        metrics["filter/kept_fraction"] = len(batch_kept) / (wanted * tries)
        if usable == 0:
            logger.warning(f"online filtering kept {len(batch_kept)} samples after {tries} tries; "
                           f"training on the unfiltered batch this step")
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
    def _has_vision(batch: DataBatch) -> bool:
        vision = batch.non_tensors.get("multi_modal_inputs")
        return vision is not None and any(key in (mm or {}) for mm in vision
                                          for key in ("pixel_values", "pixel_values_videos"))

    def _perception_pass(self, batch: DataBatch, order: Optional[List[int]]) -> None:
        """The actor's perception pass (perturbed-image log-probs, or exact dependency); po.apply_tprl uses it."""
        from mtrl.workers.actor.actor_worker import PERCEPTION_INPUTS  # imported with the worker class already

        inputs = batch.select([k for k in PERCEPTION_INPUTS if k in batch])
        batch.union(self._dp(self.actor_wg.compute_perception, inputs, order))

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
        keep = [k for k in PROMPT_NON_TENSORS if k in rows.non_tensors]
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
