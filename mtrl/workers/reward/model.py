"""Reward models: loading a scalar-head model, scoring rollouts with it (`worker.reward.reward_type: model`).

A reward model is the policy architecture with a scalar head (`ValueHeadModel`: the language model
without its vocabulary head + ``score = Linear(hidden, 1)``), trained with the Bradley-Terry loss by a
`reward_model` run or stage (mtrl/training/preference.py), which writes a Hugging Face folder: the
backbone's weights under the language model's names plus ``score.weight`` / ``score.bias``, and
``mtrl_reward_model.json``. Folders of transformers ``*ForSequenceClassification`` reward models with
one label (``model.*`` + ``score.weight``) load the same way.

During RL, `ModelRewardManager` replaces the rule-based `RewardManager`: a `RewardModelWorker` role is
colocated with the actor on every worker process (FSDP2-sharded like the actor), and each generated
batch is scored at the last response token of every row, in micro-batches of
`worker.reward.micro_batch_size_per_device`. When `worker.reward.reward_fn_path` is also set, the
reward function still runs, for its metrics only (e.g. accuracy), logged as `reward/<name>` plus
`reward/function_score`; the reward used for training is the model's score.
"""

import glob
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import transformers

from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, Worker, register
from mtrl.utils.errors import UserError

HEAD_KEYS = ("score.weight", "score.bias")
MARKER_FILE = "mtrl_reward_model.json"
SCORING_KEYS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")


def read_score_head(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """``score.weight`` (and ``score.bias`` when present) from the safetensors files of a folder, or None."""
    from safetensors import safe_open

    found: Dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for key in HEAD_KEYS:
                if key in f.keys():
                    found[key] = f.get_tensor(key)
    return found if "score.weight" in found else None


def load_reward_model(model_path: str, *, require_head: bool = True, **load_kwargs: Any):
    """A `ValueHeadModel` with the trained head of `model_path` (`require_head=False`: a fresh, seeded head
    when the folder has none, to start reward-model training from a policy)."""
    from mtrl.models.loader import load_model, resolve_model_path

    path = resolve_model_path(model_path)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the head's keys are "unexpected" for the language model
    try:
        model = load_model(path, for_value=True, **load_kwargs)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    head = read_score_head(path)
    if head is None:
        if require_head:
            raise UserError(f"'{model_path}' has no reward head (no `score.weight` in its safetensors files): train "
                            f"one with a reward_model stage (training.mode=reward_model) or point "
                            f"worker.reward.reward_model_path at such a folder.")
        return model
    with torch.no_grad():
        weight = head["score.weight"].reshape(model.score.weight.shape)
        model.score.weight.copy_(weight.to(model.score.weight.dtype))
        model.score.bias.copy_(head.get("score.bias", torch.zeros(1)).reshape(1).to(model.score.bias.dtype))
    return model


class RewardModelWorker(Worker):
    """Scores generated sequences with the reward model (a role colocated with the actor)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        from mtrl.models.attention import enable_padding_free_attention
        from mtrl.models.loader import decoder_layers, load_processor, vision_tower
        from mtrl.workers import fsdp_utils

        self.init_distributed()
        transformers.utils.logging.disable_progress_bar()
        cfg, actor = self.config.worker.reward, self.config.worker.actor
        self.model = load_reward_model(cfg.reward_model_path, attn_implementation=actor.model.attn_implementation,
                                       trust_remote_code=actor.model.trust_remote_code)
        tokenizer, _ = load_processor(cfg.reward_model_path)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if actor.padding_free:
            enable_padding_free_attention(self.model)
        self.model.requires_grad_(False)
        self.model.eval()
        fsdp_utils.apply_fsdp2(self.model, actor.fsdp, self.device.type, decoder_layers(self.model),
                               vision_tower(self.model))

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    @torch.no_grad()
    def compute_rm_scores(self, batch: DataBatch) -> DataBatch:
        from mtrl.agents.preference_agent import last_token_scores

        size = self.config.worker.reward.micro_batch_size_per_device
        scores = [last_token_scores(self.model, mb, self.device, self.config.worker.actor.padding_free,
                                    self.pad_token_id).float().cpu() for mb in batch.split(size)]
        return DataBatch(tensors={"rm_scores": torch.cat(scores) if scores else torch.zeros(0)})


class ModelRewardManager:
    """The trainer's reward manager for `reward_type: model` (see the module docstring)."""

    def __init__(self, config):
        self.config = config
        self.group = None
        self.function = None
        reward = config.worker.reward
        if reward.reward_fn_path:  # metrics only
            from dataclasses import replace

            from mtrl.workers.reward.manager import RewardManager

            self.function = RewardManager(replace(reward, reward_type="function"), config.config_dir)

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
        world = self.config.training.world_size
        pad = -len(rows) % world
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
