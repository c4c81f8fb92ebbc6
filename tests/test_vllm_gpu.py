"""The GPU-only parts of the vLLM engine: sleep mode freeing memory, CUDA graphs, tensor parallelism over NCCL.

Written against vLLM's GPU API; skipped (and reported as skipped) without CUDA GPUs and vLLM. Run them on a GPU
machine with `pytest -m gpu tests/test_vllm_gpu.py`.
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("vllm")
    from mtrl.models.tiny import build_tiny_model, make_tiny_model

    path = tmp_path_factory.mktemp("gpu") / "model"
    build_tiny_model("qwen2", path, **SIZES)
    return str(path), make_tiny_model("qwen2", **SIZES)


def _engine(path, tiny, **rollout):
    from mtrl.config.worker import RolloutConfig
    from mtrl.workers.rollout.vllm_engine import VLLMRolloutEngine

    config = RolloutConfig(max_model_len=512, gpu_memory_utilization=0.3, **rollout)
    return VLLMRolloutEngine(path, tiny.model.config, config, torch.bfloat16,
                             [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")], tiny.tokenizer.pad_token_id, seed=0)


def _prompts(tiny):
    from mtrl.protocol import DataBatch

    ids = torch.randint(10, 600, (4, 16), generator=torch.Generator().manual_seed(0))
    return DataBatch(tensors={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                     non_tensors={"uid": [str(i) for i in range(4)]})


def test_release_frees_device_memory_and_the_next_sync_restores_the_engine(model):
    from mtrl.workers.rollout import SamplingParams

    path, tiny = model
    engine = _engine(path, tiny)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    engine.load_weights(tiny.model.state_dict().items())
    first = engine.generate(_prompts(tiny), greedy)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.release()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > 0.5 * 2**30  # the KV cache (30% of the device) at least
    engine.load_weights(tiny.model.state_dict().items())
    assert torch.equal(engine.generate(_prompts(tiny), greedy)["responses"], first["responses"])


def test_cuda_graphs_give_the_eager_tokens(model):
    from mtrl.workers.rollout import SamplingParams

    path, tiny = model
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    outputs = []
    for eager in (True, False):
        engine = _engine(path, tiny, enforce_eager=eager)
        engine.load_weights(tiny.model.state_dict().items())
        outputs.append(engine.generate(_prompts(tiny), greedy)["responses"])
        del engine
    assert torch.equal(*outputs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_engine_over_nccl_matches_one_gpu(tmp_path):
    """Two processes (torchrun-style env), one TP=2 engine; each rank passes different prompts, both get all."""
    import subprocess
    import sys

    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29655", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]


TP_SCRIPT = '''
import sys, torch, torch.distributed as dist
from mtrl.config.worker import RolloutConfig
from mtrl.models.tiny import build_tiny_model, make_tiny_model
from mtrl.protocol import DataBatch
from mtrl.workers.rollout import SamplingParams
from mtrl.workers.rollout.vllm_engine import VLLMRolloutEngine
rank, folder = int(sys.argv[1]), sys.argv[2]
torch.cuda.set_device(rank)
dist.init_process_group("nccl")
sizes = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
if rank == 0:
    build_tiny_model("qwen2", folder + "/model", **sizes)
dist.barrier()
tiny = make_tiny_model("qwen2", **sizes)
engine = VLLMRolloutEngine(folder + "/model", tiny.model.config,
                           RolloutConfig(max_model_len=512, tensor_parallel_size=2, gpu_memory_utilization=0.3),
                           torch.bfloat16, [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")], 0, seed=0)
engine.load_weights(tiny.model.state_dict().items())
ids = torch.randint(10, 600, (2, 16), generator=torch.Generator().manual_seed(rank))
batch = DataBatch(tensors={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                  non_tensors={"uid": [f"{rank}-{i}" for i in range(2)]})
out = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=8))
assert out["responses"].shape == (2, 8)
assert torch.equal(out["prompts"], ids)
'''
