"""The FSDP2 worker for preference training: DPO (policy + frozen reference) or a Bradley-Terry reward model.

One Ray actor per device, like the actor worker; the controller (mtrl/training/preference.py) calls
`update` / `evaluate` on the whole group, each rank getting an equal share of the pairs, and
`export_hf` at the end.
"""

from typing import Dict

import torch
import transformers

from mtrl.agents.preference_agent import PreferenceAgent
from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.loader import decoder_layers, load_model, load_processor, vision_tower
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, Worker, register
from mtrl.workers import fsdp_utils


class PreferenceWorker(Worker):
    def __init__(self, config, mode: str):
        super().__init__()
        self.config = config
        self.mode = mode

    def _load(self, trainable: bool):
        mcfg, acfg = self.config.worker.actor.model, self.config.worker.actor
        kwargs = dict(attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code,
                      gradient_checkpointing=trainable and mcfg.enable_gradient_checkpointing,
                      freeze_vision_tower=mcfg.freeze_vision_tower or not trainable)
        if self.mode == "reward_model":
            from mtrl.workers.reward.model import load_reward_model

            torch.manual_seed(self.config.training.seed)
            model = load_reward_model(mcfg.model_path, require_head=False, **kwargs)
        else:
            model = load_model(mcfg.model_path, dtype=torch.float32, **kwargs)
        if acfg.padding_free:
            enable_padding_free_attention(model)
        if not trainable:
            model.requires_grad_(False)
        fsdp_utils.apply_fsdp2(model, acfg.fsdp, self.device.type, decoder_layers(model), vision_tower(model))
        return model

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, total_training_steps: int = 1) -> None:
        self.init_distributed()
        transformers.utils.logging.disable_progress_bar()
        acfg = self.config.worker.actor
        torch.manual_seed(self.config.training.seed)
        self.tokenizer, _ = load_processor(acfg.model.tokenizer_path or acfg.model.model_path)
        self.model = self._load(trainable=True)
        ref = self._load(trainable=False) if self.mode == "dpo" else None
        self.optimizer = fsdp_utils.build_optimizer(self.model, acfg.optim)
        self.lr_scheduler = fsdp_utils.build_lr_scheduler(self.optimizer, acfg.optim, total_training_steps)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.agent = PreferenceAgent(self.mode, acfg, self.config.optimization, self.model, self.device,
                                     self.optimizer, ref_model=ref, pad_token_id=pad)

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def update(self, batch: DataBatch) -> Dict[str, float]:
        pairs_per_mini_batch = max(1, self.config.worker.actor.global_batch_size // self.world_size)
        metrics = self.agent.update(batch, pairs_per_mini_batch)
        self.lr_scheduler.step()
        metrics["actor/lr"] = self.lr_scheduler.get_last_lr()[0]
        return metrics

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def evaluate(self, batch: DataBatch) -> DataBatch:
        return self.agent.evaluate(batch)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        from mtrl.workers.export import save_hf_folder

        extra = {"mtrl_reward_model.json": {"head": "score", "score_position": "last_response_token"}} \
            if self.mode == "reward_model" else None
        save_hf_folder(self.model, path, self.config.worker.actor.model.model_path, self.rank, extra_json=extra)

    # ------------------------------------------------------------------ checkpoints (mtrl.utils.checkpoint)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        """Sharded weights + optimizer (DCP), LR scheduler and RNG per rank, and (rank 0) the model config and
        tokenizer; the frozen DPO reference is the starting model and is not saved."""
        from mtrl.utils import checkpoint

        checkpoint.save_fsdp_state(path, self.model, self.optimizer, self.lr_scheduler,
                                   hf_artifacts=[self.model.config, self.tokenizer])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint saved by `save_checkpoint` at any world size."""
        from mtrl.utils import checkpoint

        checkpoint.load_fsdp_state(path, self.model, self.optimizer, self.lr_scheduler)
