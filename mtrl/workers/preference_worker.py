"""The FSDP2 worker for preference training: DPO (policy + frozen reference) or a Bradley-Terry reward model.

One Ray actor per device, like the actor worker; the controller (mtrl/training/preference.py) calls
`update` / `evaluate` on the whole group, each rank getting an equal share of the pairs, and
`export_hf` at the end.
"""

from typing import Dict

from mtrl.agents.preference_agent import PreferenceAgent
from mtrl.config.worker import WorkerRunConfig
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, register
from mtrl.utils import checkpoint
from mtrl.workers import fsdp_utils
from mtrl.workers.fsdp_worker import FSDPWorker


class PreferenceWorker(FSDPWorker):
    def __init__(self, config: WorkerRunConfig, mode: str):
        super().__init__(config)
        self.mode = mode

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, total_training_steps: int = 1) -> None:
        acfg = self.config.worker.actor
        self.setup_process(acfg.model.tokenizer_path or acfg.model.model_path)
        # A reward model starts from the policy with a fresh scalar head (or the folder's, if it has one).
        head = "score_or_new" if self.mode == "reward_model" else "lm"
        self.model = self.build_model(acfg.model.model_path, acfg, trainable=True, head=head)
        ref = self.build_model(acfg.model.model_path, acfg, trainable=False) if self.mode == "dpo" else None
        self.optimizer = fsdp_utils.build_optimizer(self.model, acfg.optim)
        self.lr_scheduler = fsdp_utils.build_lr_scheduler(self.optimizer, acfg.optim, total_training_steps)
        self.agent = PreferenceAgent(self.mode, acfg, self.config.optimization, self.model, self.device,
                                     self.optimizer, ref_model=ref, pad_token_id=self.pad_token_id)

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
        checkpoint.save_fsdp_state(path, self.model, self.optimizer, self.lr_scheduler,
                                   hf_artifacts=[self.model.config, self.tokenizer])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint saved by `save_checkpoint` at any world size."""
        checkpoint.load_fsdp_state(path, self.model, self.optimizer, self.lr_scheduler)
