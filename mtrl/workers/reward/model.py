"""Reward models: scoring rollouts with a scalar-head model (`worker.reward.reward_type: model`).

A reward model is the policy architecture with a scalar head (`ValueHeadModel`: the language model
without its vocabulary head + ``score = Linear(hidden, 1)``), trained with the Bradley-Terry loss by a
`reward_model` run or stage (mtrl/training/preference.py), which writes a Hugging Face folder: the
backbone's weights under the language model's names plus ``score.weight`` / ``score.bias``, and
``mtrl_reward_model.json``. Folders of transformers ``*ForSequenceClassification`` reward models with
one label (``model.*`` + ``score.weight``) load the same way (`mtrl.models.loader.load_reward_model`).

During RL, `ModelRewardManager` replaces the rule-based `RewardManager`: a `RewardModelWorker` role is
colocated with the actor on every worker process (FSDP2-sharded like the actor), and each generated
batch is scored at the last response token of every row, in micro-batches of
`worker.reward.micro_batch_size_per_device`. When `worker.reward.reward_fn_path` is also set, the
reward function still runs, for its metrics only (e.g. accuracy), logged as `reward/<name>` plus
`reward/function_score`; the reward used for training is the model's score.
"""

from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from mtrl.agents.preference_agent import last_token_scores
from mtrl.config.worker import WorkerRunConfig
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, register
from mtrl.workers.fsdp_worker import FSDPWorker
from mtrl.workers.reward.manager import RewardManager

MARKER_FILE = "mtrl_reward_model.json"
SCORING_KEYS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")


class RewardModelWorker(FSDPWorker):
    """Scores generated sequences with the reward model (a role colocated with the actor)."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        path = self.config.worker.reward.reward_model_path
        self.setup_process(path)
        # Sharded, padding-free and with the attention implementation of the policy it scores.
        self.model = self.build_model(path, self.config.worker.actor, trainable=False, head="score")
        self.model.eval()

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    @torch.no_grad()
    def compute_rm_scores(self, batch: DataBatch) -> DataBatch:
        size = self.config.worker.reward.micro_batch_size_per_device
        scores = [last_token_scores(self.model, mb, self.device, self.config.worker.actor.padding_free,
                                    self.pad_token_id).float().cpu() for mb in batch.split(size)]
        return DataBatch(tensors={"rm_scores": torch.cat(scores) if scores else torch.zeros(0)})


class ModelRewardManager:
    """The trainer's reward manager for `reward_type: model` (see the module docstring)."""

    def __init__(self, config: WorkerRunConfig, world_size: int, config_dir: Optional[str] = None):
        self.config = config
        self.world_size = world_size
        self.group = None
        self.function = None
        reward = config.worker.reward
        if reward.reward_fn_path:  # metrics only
            self.function = RewardManager(replace(reward, reward_type="function"), config_dir)

    def worker_roles(self) -> Dict[str, Any]:
        from mtrl.single_controller.ray import RayClassWithInitArgs

        return {"reward": RayClassWithInitArgs(RewardModelWorker, self.config)}

    def attach(self, groups: Dict[str, Any]) -> None:
        self.group = groups["reward"]
        self.group.init_model()

    def compute(self, batch: DataBatch) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        if self.group is None:
            raise RuntimeError("ModelRewardManager.compute called before the reward-model workers were attached")
        rows = DataBatch({k: batch.tensors[k] for k in SCORING_KEYS if k in batch.tensors},
                         {"multi_modal_inputs": batch.non_tensors["multi_modal_inputs"]})
        pad = -len(rows) % self.world_size
        if pad:
            rows = DataBatch.concat([rows, rows.index([i % len(rows) for i in range(pad)])])
        scores = self.group.compute_rm_scores(rows).tensors["rm_scores"][:len(batch)]
        metrics: Dict[str, List[float]] = {}
        if self.function is not None:
            function_scores, metrics = self.function.compute(batch)
            metrics = {**metrics, "function_score": function_scores.tolist()}
        return scores.float(), metrics

    def shutdown(self) -> None:
        if self.function is not None:
            self.function.shutdown()
