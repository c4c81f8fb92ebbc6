"""The hybrid-engine worker: FSDP2 actor, frozen reference policy and rollout engine in one process.

One Ray actor per device runs this class; the controller calls its methods on the whole group
(`mtrl.single_controller`), each rank getting its share of the batch. Phases per training step:
generate -> old log-probs (+entropy) -> perception pass -> reference log-probs -> update.
"""

from dataclasses import replace
from typing import Dict

import torch
import transformers

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.models import lora
from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.loader import decoder_layers, load_model, load_processor, vision_tower
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, Worker, register
from mtrl.training.training_config import MTRLConfig
from mtrl.utils import checkpoint
from mtrl.utils.rope import compute_position_ids
from mtrl.workers import fsdp_utils
from mtrl.workers.actor.perception import perturb_images, sample_seed
from mtrl.workers.rollout import SamplingParams, check_engine_available
from mtrl.workers.rollout.hf_engine import HFRolloutEngine

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sequence_position_ids(model_config, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          multi_modal_inputs) -> torch.Tensor:
    """Position ids of whole (prompt + response) rows, computed on each row's unpadded tokens."""
    rows = []
    for i in range(input_ids.shape[0]):
        valid = attention_mask[i].bool()
        mm = multi_modal_inputs[i] if multi_modal_inputs is not None else {}
        pos = compute_position_ids(model_config, input_ids[i][valid], image_grid_thw=mm.get("image_grid_thw"),
                                   video_grid_thw=mm.get("video_grid_thw"),
                                   second_per_grid_ts=mm.get("second_per_grid_ts"))
        pos = pos if pos.dim() == 2 else pos.view(1, -1)
        full = torch.zeros(pos.shape[0], input_ids.shape[1], dtype=torch.long)
        full[:, valid] = pos
        rows.append(full)
    out = torch.stack(rows)
    return out[:, 0] if out.shape[1] == 1 else out


class ActorRolloutRefWorker(Worker):
    def __init__(self, config: MTRLConfig, with_ref: bool = True, with_optimizer: bool = True):
        super().__init__()
        self.config = config
        self.with_ref = with_ref
        self.with_optimizer = with_optimizer
        check_engine_available(config.worker.rollout.name)

    # ------------------------------------------------------------------ setup

    def _load_fsdp_model(self, trainable: bool, adapter: bool = False):
        mcfg, acfg = self.config.worker.actor.model, self.config.worker.actor
        adapter = adapter and lora.peft_type(mcfg) is not None  # LoRA / QLoRA (mtrl.models.lora)
        kwargs = dict(attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code,
                      gradient_checkpointing=trainable and mcfg.enable_gradient_checkpointing,
                      freeze_vision_tower=mcfg.freeze_vision_tower or not trainable)
        if adapter and mcfg.peft_type == "qlora":
            model = lora.load_quantized_model(mcfg.model_path, compute_dtype=_DTYPES[acfg.fsdp.mixed_precision_dtype],
                                              **kwargs)
        else:
            model = load_model(mcfg.model_path, dtype=torch.float32, **kwargs)
        if acfg.padding_free:
            enable_padding_free_attention(model)
        if adapter:
            model = lora.apply_lora(model, mcfg)
        if not trainable:
            model.requires_grad_(False)
        fsdp_utils.apply_fsdp2(model, acfg.fsdp, self.device.type, decoder_layers(model), vision_tower(model),
                               ignored_params=lora.quantized_params(model))
        return model

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, total_training_steps: int = 1) -> None:
        self.init_distributed()
        transformers.utils.logging.disable_progress_bar()
        cfg = self.config.worker
        torch.manual_seed(self.config.training.seed)
        self.tokenizer, self.processor = load_processor(cfg.actor.model.tokenizer_path or cfg.actor.model.model_path)
        self.actor = self._load_fsdp_model(trainable=self.with_optimizer, adapter=True)
        self.model_config = self.actor.config
        # Weights for the rollout engine under the base model's names (LoRA merged in).
        self.rollout_weights = lora.RolloutWeights(cfg.actor.model, load_base=self._build_inference_model)
        optimizer = None
        if self.with_optimizer:
            optimizer = fsdp_utils.build_optimizer(self.actor, cfg.actor.optim)
            self.lr_scheduler = fsdp_utils.build_lr_scheduler(optimizer, cfg.actor.optim, total_training_steps)
        self.agent = ParallelPolicyAgent(cfg.actor, self.actor, self.device, optimizer)
        self.ref_agent = None
        # With LoRA the reference policy is the actor with its adapter disabled: no second copy.
        if self.with_ref and lora.peft_type(cfg.actor.model) is None:
            self.ref = self._load_fsdp_model(trainable=False)
            self.ref_agent = ParallelPolicyAgent(cfg.actor, self.ref, self.device)
            if cfg.ref.offload_params:
                self.ref.to("cpu")
        if cfg.actor.offload.offload_params:
            self.actor.to("cpu")
        eos = self.tokenizer.eos_token_id
        eos_ids = {eos} | set(getattr(self.actor.generation_config, "eos_token_id", None) or [])
        self.rollout = HFRolloutEngine(self._build_inference_model, self.model_config, sorted(eos_ids),
                                       self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
                                       self.device, cfg.rollout.micro_batch_size_per_device)

    def _build_inference_model(self):
        mcfg = self.config.worker.actor.model
        return load_model(mcfg.model_path, dtype=_DTYPES[self.config.worker.actor.fsdp.mixed_precision_dtype],
                          attn_implementation="sdpa", trust_remote_code=mcfg.trust_remote_code)

    # ------------------------------------------------------------------ rollout

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def generate_sequences(self, prompts: DataBatch) -> DataBatch:
        """n responses per prompt (`prompts.meta` may override sampling: temperature, n, top_p, top_k, greedy)."""
        rcfg, meta = self.config.worker.rollout, prompts.meta
        params = SamplingParams(
            n=meta.get("n", rcfg.n), temperature=meta.get("temperature", rcfg.temperature),
            top_p=meta.get("top_p", rcfg.top_p), top_k=meta.get("top_k", rcfg.top_k),
            max_new_tokens=rcfg.max_new_tokens or self.config.dataset.max_response_length,
            seed=sample_seed(self.config.training.seed, meta.get("global_step", 0), "rollout"))
        with self._actor_resident():
            self.rollout.load_weights(self.rollout_weights(self.actor).items())
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
                                                              out.non_tensors.get("multi_modal_inputs")))
        return out

    # ------------------------------------------------------------------ experience passes

    def _actor_resident(self, with_optimizer: bool = False):
        offload = self.config.worker.actor.offload
        return fsdp_utils.resident(self.device, self.actor, offload.offload_params,
                                   self.agent.optimizer if with_optimizer else None, offload.offload_optimizer)

    def _temperature(self, batch: DataBatch) -> float:
        return batch.meta.get("temperature", self.config.worker.rollout.temperature) or 1.0

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def compute_log_probs(self, batch: DataBatch) -> DataBatch:
        with self._actor_resident():
            out = self.agent.compute_log_probs(batch, self._temperature(batch), return_entropy=True)
        return DataBatch(tensors={"old_log_probs": out["log_probs"], "entropys": out["entropy"]})

    def _perturb(self, vision, mb: DataBatch):
        opt = self.config.optimization
        image_processor = self.processor.image_processor
        step = mb.meta.get("global_step", 0)
        patch = image_processor.patch_size
        if opt.perception_patch_size % patch != 0:
            raise ValueError(f"optimization.perception_patch_size={opt.perception_patch_size} must be a multiple of "
                             f"the model's vision patch size {patch}.")
        return [perturb_images(mm or {}, seed=sample_seed(self.config.training.seed, step, uid),
                               merge_size=image_processor.merge_size,
                               patches_per_cell=opt.perception_patch_size // patch, mask_prob=opt.perception_mask_prob,
                               image_mean=image_processor.image_mean, image_std=image_processor.image_std)
                for mm, uid in zip(vision, mb.non_tensors["sample_uid"])]

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def compute_perception(self, batch: DataBatch) -> DataBatch:
        """TPRL perception pass: log-probs of the same responses with every image patch-blackened."""
        temperature = self._temperature(batch)
        with self._actor_resident():
            if self.config.optimization.dependency_estimator == "full_kl":
                dependency = self.agent.compute_exact_dependency(batch, temperature, self._perturb)
                return DataBatch(tensors={"dependency": dependency})
            out = self.agent.compute_log_probs(batch, temperature, transform_vision=self._perturb)
        return DataBatch(tensors={"aug_log_probs": out["log_probs"]})

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
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
        with self._actor_resident(with_optimizer=True):
            metrics = self.agent.update_policy(batch, self._temperature(batch), opt, mini_batch_size)
        self.lr_scheduler.step()
        metrics["actor/lr"] = self.lr_scheduler.get_last_lr()[0]
        return metrics

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        """Write the policy as a Hugging Face folder at `path` (end of a stage; rank 0 writes, all ranks gather)."""
        from mtrl.workers.export import save_hf_folder

        with self._actor_resident():
            weights = self.rollout_weights(self.actor) if hasattr(self, "rollout_weights") else None
            save_hf_folder(self.actor, path, self.config.worker.actor.model.model_path, self.rank, weights=weights)

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
