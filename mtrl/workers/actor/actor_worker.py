"""The hybrid-engine worker: FSDP2 actor, frozen reference policy and rollout engine in one process.

One Ray actor per device runs this class; the controller calls its methods on the whole group
(`mtrl.single_controller`), each rank getting its share of the batch. Phases per training step:
generate -> old log-probs (+entropy; unless the engine records them or the update's own forward gives them:
`worker.actor.old_log_probs`) -> perception pass -> reference log-probs -> update.
"""

from dataclasses import replace
from functools import partial
from typing import Dict

import torch

from mtrl.agents.parallel_policy_agent import FORWARD_KEYS, ParallelPolicyAgent
from mtrl.config.worker import WorkerRunConfig
from mtrl.models import lora
from mtrl.models.dtypes import resolve_dtype
from mtrl.models.loader import load_model
from mtrl.models.ulysses import SequenceParallel
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, register
from mtrl.utils import checkpoint
from mtrl.utils.rope import compute_position_ids
from mtrl.workers import fsdp_utils
from mtrl.utils.seeding import sample_seed
from mtrl.workers.actor.perception import patches_per_cell, perturb_images
from mtrl.workers.fsdp_worker import FSDPWorker
from mtrl.workers.rollout import SamplingParams, check_engine_available
from mtrl.workers.rollout.hf_engine import HFRolloutEngine
from mtrl.workers.rollout.weight_sync import RolloutWeightSync

# The columns the perception pass reads (the forward's, the response mask for `full_kl`, the vision inputs and
# the uids that seed each sample's perturbation): the controller sends it only these.
PERCEPTION_INPUTS = (*FORWARD_KEYS, "response_mask", "multi_modal_inputs", "sample_uid")


def _row_position_ids(model_config, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm) -> torch.Tensor:
    """(3 or 1, L) positions of one padded row, computed on its unpadded tokens (padding holds 0)."""
    valid = attention_mask.bool()
    pos = compute_position_ids(model_config, input_ids[valid], image_grid_thw=mm.get("image_grid_thw"),
                               video_grid_thw=mm.get("video_grid_thw"),
                               second_per_grid_ts=mm.get("second_per_grid_ts"))
    pos = pos if pos.dim() == 2 else pos.view(1, -1)
    full = torch.zeros(pos.shape[0], input_ids.shape[0], dtype=torch.long)
    full[:, valid] = pos
    return full


def sequence_position_ids(model_config, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          multi_modal_inputs, prompt_length: int = 0) -> torch.Tensor:
    """Position ids of whole (prompt + response) rows, computed on each row's unpadded tokens.

    With `prompt_length` (each row is `prompt_length` prompt tokens, then the response) a prompt's
    positions are computed once for its n samples and a text-only response continues the prompt's
    last position by one per kept token: the same numbers as the whole-row computation, which rows
    with a vision token in the response or at the end of the prompt still take (with its checks)."""
    n = input_ids.shape[0]
    mms = multi_modal_inputs if multi_modal_inputs is not None else [{}] * n
    vision = torch.tensor([t for t in (getattr(model_config, "image_token_id", None),
                                       getattr(model_config, "video_token_id", None)) if t is not None])
    prompt_mask, response_mask = attention_mask[:, :prompt_length], attention_mask[:, prompt_length:].bool()
    fast = torch.zeros(n, dtype=torch.bool)
    if prompt_length > 0:
        last = prompt_length - 1 - prompt_mask.flip(-1).argmax(-1)  # the last kept prompt token
        fast = (prompt_mask.any(-1) & ~torch.isin(input_ids.gather(1, last.view(-1, 1)).view(-1), vision)
                & ~(torch.isin(input_ids[:, prompt_length:], vision) & response_mask).any(-1))
    prompt_rows = (input_ids[:, :prompt_length] * prompt_mask).tolist()
    unique: Dict[tuple, int] = {}
    prompt_positions, prompt_of, slow = [], [], {}
    for i, (mm, is_fast) in enumerate(zip(mms, fast.tolist())):
        if not is_fast:
            slow[i] = _row_position_ids(model_config, input_ids[i], attention_mask[i], mm)
            continue
        key = (tuple(prompt_rows[i]),) + tuple(
            None if mm.get(k) is None else tuple(torch.as_tensor(mm[k]).reshape(-1).tolist())
            for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"))
        if key not in unique:
            unique[key] = len(prompt_positions)
            prompt_positions.append(_row_position_ids(model_config, input_ids[i, :prompt_length], prompt_mask[i], mm))
        prompt_of.append(unique[key])
    channels = (prompt_positions or list(slow.values()))[0].shape[0]
    out = torch.zeros(n, channels, input_ids.shape[1], dtype=torch.long)
    if prompt_of:
        fast_rows = fast.nonzero().view(-1)
        prompt_part = torch.stack(prompt_positions)[torch.tensor(prompt_of)]  # (fast rows, channels, prompt)
        start = prompt_part[:, 0].gather(1, last[fast_rows].view(-1, 1)) + 1
        kept = response_mask[fast_rows]
        response = torch.where(kept, kept.long().cumsum(-1) - 1 + start, 0)
        out[fast_rows] = torch.cat([prompt_part, response.unsqueeze(1).expand(-1, channels, -1)], dim=-1)
    for i, row in slow.items():
        out[i] = row
    return out[:, 0] if channels == 1 else out


class ActorRolloutRefWorker(FSDPWorker):
    def __init__(self, config: WorkerRunConfig, with_ref: bool = True, with_optimizer: bool = True):
        super().__init__(config)
        self.with_ref = with_ref
        self.with_optimizer = with_optimizer
        check_engine_available(config.worker.rollout.name)

    # ------------------------------------------------------------------ setup

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, total_training_steps: int = 1) -> None:
        cfg = self.config.worker
        model_path = cfg.actor.model.model_path
        self.setup_process(cfg.actor.model.tokenizer_path or model_path)
        # The adapter (peft_type: LoRA / QLoRA, mtrl.models.lora) goes on the actor only.
        self.actor = self.build_model(model_path, cfg.actor, trainable=self.with_optimizer, adapter=cfg.actor.model)
        self.model_config = self.actor.config
        self.weight_sync = RolloutWeightSync(self.actor, cfg.actor.model, load_base=self._build_inference_model,
                                             dtype=resolve_dtype(cfg.actor.fsdp.mixed_precision_dtype),
                                             lora_sync=cfg.rollout.lora_sync)
        optimizer = None
        if self.with_optimizer:
            optimizer = fsdp_utils.build_optimizer(self.actor, cfg.actor.optim)
            self.lr_scheduler = fsdp_utils.build_lr_scheduler(optimizer, cfg.actor.optim, total_training_steps)
        sequence_parallel = SequenceParallel.create(cfg.actor.ulysses_size)
        self.agent = ParallelPolicyAgent(cfg.actor, self.actor, self.device, optimizer, sequence_parallel)
        self.ref_agent = None
        # With LoRA the reference policy is the actor with its adapter disabled: no second copy.
        if self.with_ref and lora.peft_type(cfg.actor.model) is None:
            self.ref = self.build_model(model_path, cfg.actor, trainable=False)
            self.ref_agent = ParallelPolicyAgent(cfg.actor, self.ref, self.device, sequence_parallel=sequence_parallel)
            if cfg.ref.offload_params:
                self.ref.to("cpu")
        if cfg.actor.offload.offload_params:
            self.actor.to("cpu")
        eos = self.tokenizer.eos_token_id
        eos_ids = {eos} | set(getattr(self.actor.generation_config, "eos_token_id", None) or [])
        self.rollout = self._build_rollout_engine(sorted(eos_ids))

    def _build_rollout_engine(self, eos_ids):
        cfg = self.config.worker
        if cfg.rollout.name == "vllm":
            from mtrl.workers.rollout.vllm_engine import VLLMRolloutEngine

            model = cfg.actor.model
            return VLLMRolloutEngine(model.model_path, self.model_config, cfg.rollout,
                                     resolve_dtype(cfg.actor.fsdp.mixed_precision_dtype), eos_ids, self.pad_token_id,
                                     seed=self.config.seed,
                                     lora_rank=model.lora_rank if lora.peft_type(model) is not None else None,
                                     trust_remote_code=model.trust_remote_code)
        return HFRolloutEngine(partial(self._build_inference_model, empty=True), self.model_config, eos_ids,
                               self.pad_token_id, self.device, cfg.rollout.micro_batch_size_per_device,
                               policy_stats=cfg.actor.old_log_probs == "rollout")

    def _build_inference_model(self, empty: bool = False):
        """The plain policy in the compute dtype; `empty`: without its weights (the rollout engine's, which
        the weight sync fills), else read from the checkpoint (QLoRA's base weights)."""
        actor = self.config.worker.actor
        return load_model(actor.model.model_path, dtype=resolve_dtype(actor.fsdp.mixed_precision_dtype),
                          attn_implementation="sdpa", trust_remote_code=actor.model.trust_remote_code, empty=empty)

    # ------------------------------------------------------------------ rollout

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    @fsdp_utils.measured("generate")
    def generate_sequences(self, prompts: DataBatch) -> DataBatch:
        """n responses per prompt (`prompts.meta` may override sampling: temperature, n, top_p, top_k, greedy)."""
        rcfg, meta = self.config.worker.rollout, prompts.meta
        params = SamplingParams(
            n=meta.get("n", rcfg.n), temperature=meta.get("temperature", rcfg.temperature),
            top_p=meta.get("top_p", rcfg.top_p), top_k=meta.get("top_k", rcfg.top_k),
            max_new_tokens=rcfg.max_new_tokens,
            seed=sample_seed(self.config.seed, meta.get("global_step", 0), "rollout"))
        with self._actor_resident():
            self.weight_sync.sync_to(self.rollout)
        out = self.rollout.generate(prompts, params)
        self.rollout.release()
        return self._complete_sequences(out)

    def _complete_sequences(self, out: DataBatch) -> DataBatch:
        """Whole-sequence input ids, attention mask and position ids (prompt + response)."""
        prompts, responses = out.tensors["prompts"], out.tensors["responses"]
        prompt_mask = out.tensors["attention_mask"]
        input_ids = torch.cat([prompts, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, out.tensors["response_mask"]], dim=1)
        out.tensors.update(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=sequence_position_ids(self.model_config, input_ids, attention_mask,
                                                              out.non_tensors.get("multi_modal_inputs"),
                                                              prompt_length=prompts.shape[1]))
        return out

    # ------------------------------------------------------------------ experience passes

    def _actor_resident(self, with_optimizer: bool = False):
        offload = self.config.worker.actor.offload
        return fsdp_utils.resident(self.device, self.actor, offload.offload_params,
                                   self.agent.optimizer if with_optimizer else None, offload.offload_optimizer)

    def _temperature(self, batch: DataBatch) -> float:
        return batch.meta.get("temperature", self.config.worker.rollout.temperature) or 1.0

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    @fsdp_utils.measured("log_probs")
    def compute_log_probs(self, batch: DataBatch) -> DataBatch:
        with self._actor_resident():
            out = self.agent.compute_log_probs(batch, self._temperature(batch), return_entropy=True)
        return DataBatch(tensors={"old_log_probs": out["log_probs"], "entropys": out["entropy"]})

    def _perturb(self, vision, mb: DataBatch):
        opt = self.config.optimization
        image_processor = self.processor.image_processor
        video_processor = getattr(self.processor, "video_processor", None) or image_processor
        step = mb.meta.get("global_step", 0)
        cells = patches_per_cell(opt.perception_patch_size, image_processor.patch_size)
        return [perturb_images(mm or {}, seed=sample_seed(self.config.seed, step, uid),
                               merge_size=image_processor.merge_size,
                               patches_per_cell=cells, mask_prob=opt.perception_mask_prob,
                               image_mean=image_processor.image_mean, image_std=image_processor.image_std,
                               video_mean=video_processor.image_mean, video_std=video_processor.image_std)
                for mm, uid in zip(vision, mb.non_tensors["sample_uid"])]

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    @fsdp_utils.measured("perception")
    def compute_perception(self, batch: DataBatch) -> DataBatch:
        """TPRL perception pass: log-probs of the same responses with every image and video frame patch-blackened."""
        temperature = self._temperature(batch)
        with self._actor_resident():
            if self.config.optimization.dependency_estimator == "full_kl":
                dependency = self.agent.compute_exact_dependency(batch, temperature, self._perturb)
                return DataBatch(tensors={"dependency": dependency})
            out = self.agent.compute_log_probs(batch, temperature, transform_vision=self._perturb)
        return DataBatch(tensors={"aug_log_probs": out["log_probs"]})

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    @fsdp_utils.measured("ref")
    def compute_ref_log_probs(self, batch: DataBatch) -> DataBatch:
        if self.ref_agent is None:  # LoRA: the base model is the reference policy
            with self._actor_resident(), self.actor.disable_adapter():
                out = self.agent.compute_log_probs(batch, self._temperature(batch))
            return DataBatch(tensors={"ref_log_probs": out["log_probs"]})
        with fsdp_utils.resident(self.device, self.ref, self.config.worker.ref.offload_params):
            out = self.ref_agent.compute_log_probs(batch, self._temperature(batch))
        return DataBatch(tensors={"ref_log_probs": out["log_probs"]})

    # ------------------------------------------------------------------ update

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def update_actor(self, batch: DataBatch) -> Dict[str, float]:
        cfg = self.config.worker
        # CHORD / SFT batches say how many rows (expert rows included) make one mini-batch.
        samples_per_mini_batch = batch.meta.get("samples_per_mini_batch") or \
            cfg.actor.global_batch_size * batch.meta.get("n", cfg.rollout.n)
        mini_batch_size = max(1, samples_per_mini_batch // self.world_size)
        opt = self.config.optimization
        if "entropy_bonus_coef" in batch.meta:  # the controller's coefficient for this step
            opt = replace(opt, entropy_bonus_coef=batch.meta["entropy_bonus_coef"])
        with self.memory.phase("update"), self._actor_resident(with_optimizer=True):
            metrics = self.agent.update_policy(batch, self._temperature(batch), opt, mini_batch_size)
        self.lr_scheduler.step()
        metrics["actor/lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics.update(self.memory.report())  # this step's phases, and the host RSS
        return metrics

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        """Write the policy as a Hugging Face folder at `path` (end of a stage; rank 0 writes, all ranks gather)."""
        from mtrl.workers.export import save_hf_folder

        with self._actor_resident():
            save_hf_folder(self.actor, path, self.config.worker.actor.model.model_path, self.rank,
                           weights=dict(self.weight_sync.weights()))

    # ------------------------------------------------------------------ checkpoints (mtrl.utils.checkpoint)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        """Sharded weights + optimizer (DCP), LR scheduler and RNG per rank, and (rank 0) the HF config,
        generation config, tokenizer / processor and LoRA config that export needs."""
        artifacts = [self.model_config, getattr(self.actor, "generation_config", None), self.processor or self.tokenizer]
        if lora.is_peft_model(self.actor):
            artifacts.append(self.actor.peft_config["default"])
        with self._actor_resident(with_optimizer=True):
            checkpoint.save_fsdp_state(path, self.actor, self.agent.optimizer, getattr(self, "lr_scheduler", None),
                                       hf_artifacts=artifacts,
                                       save_frozen=self.config.worker.actor.model.peft_type != "qlora")

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint saved by `save_checkpoint` at any world size (weights only without an optimizer)."""
        with self._actor_resident(with_optimizer=True):
            checkpoint.load_fsdp_state(path, self.actor, self.agent.optimizer, getattr(self, "lr_scheduler", None),
                                       load_frozen=self.config.worker.actor.model.peft_type != "qlora")
