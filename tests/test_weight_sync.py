"""Streamed rollout weight sync (issue 14): `RolloutWeightSync.weights()` gathers one tensor at a time, cast to the
rollout dtype first, and the `hf` engine copies each into its parameter as it arrives. On two real gloo ranks
(Ray workers, FSDP2-sharded actor) the engine must end up with bit-identical weights to today's way (the whole
full state dict gathered, LoRA merged over the whole dict, `load_state_dict`), for a plain model with tied
embeddings, an untied one and a LoRA adapter with non-zero factors, after a first sync and after a release; and
no gathered tensor may outlive the consumer's use of it (the stream keeps nothing).
"""

import sys
import weakref
from pathlib import Path

import pytest
import torch

from mtrl.models.tiny import build_tiny_model
from mtrl.single_controller.base import Dispatch, Worker, register

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LORA = dict(peft_type="lora", lora_rank=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj", "down_proj"])


def todays_weights(model, adapter):
    """What the sync handed out before: the whole full state dict on every rank, LoRA merged over the dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mtrl.models import lora

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    if lora.peft_type(adapter) is None:
        return full
    return lora.merge_lora_state_dict(full, float(adapter.lora_alpha) / float(adapter.lora_rank))


class SyncWorker(Worker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def compare(self, model_path: str, lora_kwargs=None, rollout_dtype: str = "bf16") -> dict:
        from mtrl.config.worker import FSDPConfig, ModelConfig
        from mtrl.models.dtypes import resolve_dtype
        from mtrl.models.loader import load_model
        from mtrl.workers.fsdp_worker import build_fsdp_model
        from mtrl.workers.rollout.hf_engine import HFRolloutEngine
        from mtrl.workers.rollout.weight_sync import RolloutWeightSync

        self.init_distributed()
        dtype = resolve_dtype(rollout_dtype)
        adapter = ModelConfig(**(lora_kwargs or {}))
        torch.manual_seed(0)
        actor = build_fsdp_model(model_path, fsdp=FSDPConfig(mixed_precision_dtype=rollout_dtype),
                                 device_type="cpu", trainable=True, adapter=adapter if lora_kwargs else None)
        with torch.no_grad():  # non-zero LoRA factors (B starts at 0), different on each rank's shard
            generator = torch.Generator().manual_seed(1 + self.rank)
            for name, param in actor.named_parameters():
                if "lora_" in name:
                    local = param.to_local()
                    local.copy_(torch.randn(local.shape, generator=generator) * 0.1)

        reference = load_model(model_path, dtype=dtype)
        missing, unexpected = reference.load_state_dict(todays_weights(actor, adapter), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        reference.tie_weights()

        sync = RolloutWeightSync(actor, adapter, dtype=dtype)
        engine = HFRolloutEngine(lambda: load_model(model_path, dtype=dtype, empty=True), reference.config, [0], 0,
                                 torch.device("cpu"))
        results = {}
        for attempt in ("first", "after_release"):
            sync.sync_to(engine)
            got, want = engine.model.state_dict(), reference.state_dict()
            results[attempt] = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            results[f"{attempt}_dtypes"] = sorted({str(p.dtype) for p in engine.model.parameters()})
            results[f"{attempt}_tied"] = engine.model.lm_head.weight is engine.model.get_input_embeddings().weight
            engine.release()

        # The stream keeps nothing: once the consumer drops a tensor, it is gone (no dict of everything behind it).
        refs, most_alive, count = [], 0, 0
        for _, tensor in sync.weights(dtype):
            refs.append(weakref.ref(tensor))
            del tensor
            most_alive = max(most_alive, sum(r() is not None for r in refs))
            count += 1
        base_weights = load_model(model_path, dtype=dtype).state_dict()
        key = next(k for k in base_weights if k.endswith("layers.0.self_attn.q_proj.weight"))
        base = base_weights[key]
        results.update(most_alive=most_alive, count=count,
                       differs_from_base=not torch.equal(reference.state_dict()[key], base))
        return results


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_sync")
    return {"tied": str(build_tiny_model("qwen2", root / "tied")),
            "untied": str(build_tiny_model("qwen2", root / "untied", tie_word_embeddings=False)),
            "vl": str(build_tiny_model("qwen2_vl", root / "vl"))}


@pytest.fixture(scope="module")
def workers():
    from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, init_ray

    init_ray(num_cpus=4)
    group = RayWorkerGroup(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(SyncWorker), name_prefix="sync")
    yield group
    group.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("model, lora_kwargs, rollout_dtype", [
    ("tied", None, "bf16"), ("untied", None, "bf16"), ("vl", None, "fp32"), ("tied", LORA, "bf16"),
])
def test_streamed_sync_gives_the_engine_the_same_weights_as_the_full_gather(tiny_dirs, workers, model, lora_kwargs,
                                                                             rollout_dtype):
    for rank in workers.compare(tiny_dirs[model], lora_kwargs, rollout_dtype):
        assert rank["first"] and rank["after_release"]
        dtype = {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[rollout_dtype]
        assert rank["first_dtypes"] == rank["after_release_dtypes"] == [dtype]
        assert rank["first_tied"] == rank["after_release_tied"] == (model != "untied")
        assert rank["count"] > 10 and rank["most_alive"] == 0
        if lora_kwargs:
            assert rank["differs_from_base"]  # the merged adapter really changed the weights the engine got
