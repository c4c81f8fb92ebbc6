"""Sharded loading (issue 14): `build_fsdp_model` builds the model on the meta device on every rank, rank 0 alone
reads the checkpoint and its weights are broadcast into the FSDP2 shards. On two real gloo ranks (Ray workers)
the result must be bit-identical to what every rank loading the whole checkpoint itself and sharding it gave:
the same logits for every tiny architecture (with images for the VL ones, which exercises the vision tower and
its rotary buffers, computed at construction and in no checkpoint), the same weights, and the same for the
critic's value head, the reward model's trained head, a LoRA adapter (its random initial weights included) and
a frozen reference stored in the compute dtype.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtrl.models.tiny import ARCHS, build_tiny_model
from mtrl.single_controller.base import Dispatch, Worker, register

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LORA = dict(peft_type="lora", lora_rank=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])


def todays_build(model_path, fsdp, trainable, head="lm", adapter=None):
    """What `build_fsdp_model` did before sharded loading: every rank loads the whole fp32 model, then shards it."""
    from mtrl.models import lora
    from mtrl.models.loader import decoder_layers, load_model, load_reward_model, vision_tower
    from mtrl.workers.fsdp_utils import apply_fsdp2

    if head == "score":
        model = load_reward_model(model_path)
    else:
        model = load_model(model_path, for_value=head == "value")
    if adapter is not None:
        model = lora.apply_lora(model, adapter)
    if not trainable:
        model.requires_grad_(False)
    return apply_fsdp2(model, fsdp, "cpu", decoder_layers(model), vision_tower(model))


class LoadWorker(Worker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def compare(self, model_path: str, inputs: dict, head: str = "lm", lora_kwargs=None, trainable: bool = True,
                compute_dtype: str = "fp32") -> dict:
        from mtrl.config.worker import FSDPConfig, ModelConfig
        from mtrl.workers.fsdp_worker import build_fsdp_model

        self.init_distributed()
        fsdp = FSDPConfig(mixed_precision_dtype=compute_dtype)
        adapter = ModelConfig(**lora_kwargs) if lora_kwargs else None
        torch.manual_seed(0)
        old = todays_build(model_path, fsdp, trainable, head, adapter)
        old_rng = torch.get_rng_state()
        torch.manual_seed(0)
        new = build_fsdp_model(model_path, fsdp=fsdp, device_type="cpu", trainable=trainable, head=head,
                               adapter=adapter)
        rng_equal = torch.equal(old_rng, torch.get_rng_state())
        with torch.no_grad():
            logits = [m(**inputs, use_cache=False).logits for m in (old, new)] if head == "lm" else \
                [m(**inputs).logits for m in (old, new)]
        from torch.distributed.fsdp import FSDPModule

        from mtrl.models.loader import vision_blocks, vision_tower

        old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
        return {
            "logits": logits,
            "names_equal": list(old_params) == list(new_params),
            "weights_equal": all(torch.equal(p.full_tensor().to(new_params[n].dtype), new_params[n].full_tensor())
                                 for n, p in old_params.items()),
            "dtypes": sorted({str(p.dtype) for p in new.parameters()}),
            "sharded": sum(p.to_local().numel() < p.numel() for p in new.parameters()),
            "buffers_equal": all(torch.equal(b, dict(new.named_buffers())[n]) for n, b in old.named_buffers()),
            "requires_grad_equal": [p.requires_grad for p in old.parameters()] ==
                                   [p.requires_grad for p in new.parameters()],
            "rng_equal": rng_equal,
            # Each vision block its own FSDP unit, under the tower's unit (issue 14).
            "vision_units": [isinstance(m, FSDPModule) for m in [vision_tower(new), *vision_blocks(new)] if m is not None],
            "tied": new.get_output_embeddings().weight is new.get_input_embeddings().weight
            if head == "lm" and adapter is None else None,
        }


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_load")
    return {arch: Path(build_tiny_model(arch, root / arch)) for arch in ARCHS}


@pytest.fixture(scope="module")
def workers():
    from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, init_ray

    init_ray(num_cpus=4)
    group = RayWorkerGroup(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(LoadWorker), name_prefix="meta")
    yield group
    group.shutdown()
    ray.shutdown()


def model_inputs(model_path: str) -> dict:
    """Two rows with an image each (VL models), or two rows of text."""
    from mtrl.models.loader import load_processor

    tokenizer, processor = load_processor(model_path)
    if processor is None:
        batch = tokenizer(["a red circle left of a blue square", "count the shapes"], return_tensors="pt",
                          padding=True)
        return dict(batch)
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(56, 56, 3) * 255).astype("uint8")) for _ in range(2)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text] * 2, images=images, return_tensors="pt", padding=True))


def check(per_rank, dtypes=("torch.float32",)):
    for rank in per_rank:
        old, new = rank["logits"]
        assert old.abs().sum() > 0
        assert torch.equal(old, new), f"max |diff| {(old - new).abs().max()}"
        assert rank["names_equal"] and rank["weights_equal"] and rank["buffers_equal"] and rank["requires_grad_equal"]
        assert rank["rng_equal"]  # the global RNG is where every rank loading the model left it
        assert rank["sharded"] > 0
        assert rank["dtypes"] == list(dtypes)
        assert rank["tied"] in (True, None)
        assert all(rank["vision_units"])
    assert torch.equal(per_rank[0]["logits"][1], per_rank[1]["logits"][1])


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_load_gives_the_same_logits_as_loading_on_every_rank(tiny_dirs, workers, arch):
    path = str(tiny_dirs[arch])
    per_rank = workers.compare(path, model_inputs(path))
    check(per_rank)
    assert len(per_rank[0]["vision_units"]) == (0 if arch == "qwen2" else 3)  # the tower and its 2 blocks


def test_value_head_and_lora(tiny_dirs, workers):
    path = str(tiny_dirs["qwen2_vl"])
    inputs = model_inputs(path)
    check(workers.compare(path, inputs, head="value"))
    check(workers.compare(path, inputs, lora_kwargs=LORA))


def test_reward_model_head(tiny_dirs, workers, tmp_path):
    from safetensors.torch import save_file

    from mtrl.models.loader import load_model

    # A reward-model folder: the tiny policy's weights plus a trained `score` head.
    model = load_model(str(tiny_dirs["qwen2"]))
    model.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(3)
    save_file({"score.weight": torch.randn(1, model.config.hidden_size, generator=generator),
               "score.bias": torch.tensor([0.25])}, str(tmp_path / "score.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dirs["qwen2"] / name).read_bytes())
    check(workers.compare(str(tmp_path), model_inputs(str(tiny_dirs["qwen2"])), head="score", trainable=False))


def test_frozen_reference_in_bf16_gives_the_same_logits_as_fp32_weights_cast_for_compute(tiny_dirs, workers):
    """The reference is stored in the compute dtype now: bf16 weights give exactly what fp32 weights with bf16
    mixed precision gave (FSDP cast them to bf16 for every forward), at half the memory."""
    path = str(tiny_dirs["qwen2_vl"])
    check(workers.compare(path, model_inputs(path), trainable=False, compute_dtype="bf16"),
          dtypes=("torch.bfloat16",))
