"""The one worker set-up and FSDP model builder (mtrl/workers/fsdp_worker.py), the config the driver fills in for
the workers (mtrl/training/worker_run_config.py), the dtype map and the package logger.

The builder runs for real: FSDP2 on a one-process gloo group that `FSDPWorker.setup_process` joins."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mtrl.config.worker import ActorConfig, FSDPConfig, ModelConfig, WorkerRunConfig
from mtrl.models.dtypes import resolve_dtype
from mtrl.models.loader import ValueHeadModel, load_model
from mtrl.single_controller.base.worker import find_free_port
from mtrl.training.training_config import MTRLConfig
from mtrl.training.worker_run_config import build_worker_run_config
from mtrl.utils.errors import UserError
from mtrl.utils.logger import get_logger
from mtrl.workers.fsdp_worker import FSDPWorker, build_fsdp_model, pad_token_id


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from mtrl.models.tiny import ensure_tiny_model

    return ensure_tiny_model(str(tmp_path_factory.getbasetemp() / "tiny_qwen2_vl_lora"), arch="qwen2_vl")


@pytest.fixture(scope="module")
def worker(tiny_path):
    """An FSDPWorker set up as rank 0 of a group of one (the process group is torn down afterwards)."""
    mp = pytest.MonkeyPatch()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        mp.delenv(key, raising=False)
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    mp.setenv("MASTER_PORT", str(find_free_port("127.0.0.1")))
    w = FSDPWorker(WorkerRunConfig(seed=11))
    w.setup_process(tiny_path)
    yield w
    dist.destroy_process_group()
    mp.undo()


def fp32_actor(**model) -> ActorConfig:
    return ActorConfig(model=ModelConfig(**model), fsdp=FSDPConfig(mixed_precision_dtype="fp32"))


def test_setup_joins_the_group_seeds_and_loads_the_tokenizer(worker):
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert worker.tokenizer.pad_token == "<|endoftext|>"
    assert worker.pad_token_id == worker.tokenizer.pad_token_id
    assert worker.processor is not None  # a VL model: the image processor too
    expected = torch.Generator().manual_seed(11)
    worker.setup_process()  # seeds again; the group is joined once per process
    assert torch.equal(torch.rand(4), torch.rand(4, generator=expected))
    # A lone CPU worker computes with every core (Ray would leave it one thread).
    assert torch.get_num_threads() == os.cpu_count()


def test_pad_token_falls_back_to_end_of_text_then_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=7)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_trainable_policy_is_sharded_and_computes_what_the_plain_model_computes(worker, tiny_path):
    role = fp32_actor(freeze_vision_tower=True)
    model = worker.build_model(tiny_path, role, trainable=True)
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    assert all(not p.requires_grad for n, p in params.items() if n.startswith("model.visual."))
    assert any(p.requires_grad for n, p in params.items() if not n.startswith("model.visual."))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(tiny_path)(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_frozen_models_heads_and_adapters(worker, tiny_path):
    role = fp32_actor()
    frozen = worker.build_model(tiny_path, role, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    critic = worker.build_model(tiny_path, role, trainable=True, head="value")
    assert isinstance(critic, ValueHeadModel)
    reward = worker.build_model(tiny_path, role, trainable=True, head="score_or_new")  # a fresh, seeded head
    torch.testing.assert_close(reward.score.weight.full_tensor(), critic.score.weight.full_tensor())
    with pytest.raises(UserError, match="has no reward head"):
        worker.build_model(tiny_path, role, trainable=False, head="score")
    adapter = ModelConfig(peft_type="lora", lora_rank=4, lora_alpha=8, lora_target_modules=["q_proj"])
    policy = worker.build_model(tiny_path, role, trainable=True, adapter=adapter)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="head='critic'"):
        build_fsdp_model(tiny_path, fsdp=role.fsdp, device_type="cpu", trainable=False, head="critic")


def test_weight_sync_hands_the_engine_full_weights_under_the_base_names(worker, tiny_path):
    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    plain = load_model(tiny_path).state_dict()
    sharded = worker.build_model(tiny_path, fp32_actor(), trainable=True)
    weights = dict(RolloutWeightSync(sharded, ModelConfig()).weights())
    assert weights.keys() == plain.keys()
    assert all(not isinstance(v, DTensor) and torch.equal(v, plain[k]) for k, v in weights.items())
    adapter = ModelConfig(peft_type="lora", lora_rank=4, lora_alpha=8, lora_target_modules=["q_proj"])
    with_lora = worker.build_model(tiny_path, fp32_actor(), trainable=True, adapter=adapter)
    merged = dict(RolloutWeightSync(with_lora, adapter).weights())  # B = 0 at start: the base weights
    assert merged.keys() == plain.keys() and all(torch.equal(v, plain[k]) for k, v in merged.items())


def test_the_driver_fills_in_what_workers_read_from_other_sections():
    config = MTRLConfig()
    config.dataset.max_response_length, config.training.seed, config.optimization.gamma = 48, 5, 0.5
    config.worker.actor.model.model_path = "/m/policy"
    run = build_worker_run_config(config)
    assert run.seed == 5 and run.optimization.gamma == 0.5
    assert run.worker.rollout.max_new_tokens == 48
    assert run.worker.critic.model.model_path == "/m/policy"
    # The user's config is left as it was (it is saved and printed as given).
    assert config.worker.rollout.max_new_tokens is None and config.worker.critic.model.model_path is None
    config.worker.rollout.max_new_tokens, config.worker.critic.model.model_path = 16, "/m/critic"
    run = build_worker_run_config(config)
    assert run.worker.rollout.max_new_tokens == 16 and run.worker.critic.model.model_path == "/m/critic"


def test_one_dtype_map():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use one of bf16, fp16, fp32"):
        resolve_dtype("int8")


def test_package_logger_prefixes_lines_and_propagates(capsys, caplog):
    logger = get_logger("mtrl.tests.example")
    with caplog.at_level(logging.INFO, logger="mtrl.tests.example"):
        logger.info("built %d things", 3)
    assert "[mtrl] built 3 things" in capsys.readouterr().err
    assert caplog.records[-1].getMessage() == "built 3 things"
    assert len([h for h in logging.getLogger("mtrl").handlers]) == 1
    get_logger("mtrl.tests.other")
    assert len(logging.getLogger("mtrl").handlers) == 1
