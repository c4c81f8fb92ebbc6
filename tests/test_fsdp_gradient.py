"""The FSDP2-sharded gradient equals the unsharded model's gradient on the same batch (issue 19).

Two real Ray worker processes shard the tiny Qwen2-VL with FSDP2 (gloo) and run the actor's update
(`ParallelPolicyAgent.update_policy`) on their halves of a batch with images; an optimizer that only
records the (full) gradients stands in for Adam. The same update runs on the whole batch in this
process on an unsharded copy. Both the policy-gradient path (TPRL token mask, every loss aggregation)
and the SFT path (expert rows) are checked.
"""

import math
import sys

import pytest
import torch

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.models.loader import load_config, load_processor
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, Worker, register
from mtrl.utils.sft_dataset import SFTDataset
from mtrl.config.worker import ActorConfig
from shapes_assets import dataset_kwargs, load_policy, shapes_task, tiny_vl_model

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules["shapes_assets"])

ROWS = 8
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class GradientRecorder(torch.optim.Optimizer):
    """Keeps the full gradient of every parameter at `step` and changes nothing."""

    def __init__(self, named_params):
        self.names = {id(p): n for n, p in named_params}
        super().__init__([p for _, p in named_params], {})
        self.grads = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    self.grads[self.names[id(p)]] = grad.detach().clone()


def update_gradients(model, batch: DataBatch, loss_agg_mode: str, micro_batch: int):
    config = ActorConfig(loss_agg_mode=loss_agg_mode, dynamic_batching=False, max_grad_norm=1e9,
                         micro_batch_size_per_device_for_update=micro_batch)
    recorder = GradientRecorder(list(model.named_parameters()))
    agent = ParallelPolicyAgent(config, model, torch.device("cpu"), recorder)
    agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=len(batch))
    return recorder.grads


class ShardedGradientWorker(Worker):
    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def gradients(self, batch: DataBatch, model_path: str, loss_agg_mode: str) -> dict:
        from mtrl.config.worker import FSDPConfig
        from mtrl.workers.fsdp_worker import build_fsdp_model

        self.init_distributed()
        model = build_fsdp_model(model_path, fsdp=FSDPConfig(mixed_precision_dtype="fp32"), device_type="cpu",
                                 trainable=True, padding_free=True)
        sharded = [n for n, p in model.named_parameters() if p.to_local().numel() < p.numel()]
        return {"grads": update_gradients(model, batch, loss_agg_mode, micro_batch=1), "sharded": len(sharded)}

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def nan_then_finite_update(self, batch: DataBatch, model_path: str) -> dict:
        """Two updates with SGD: the given batch (NaN advantages on one rank only), then the same made finite."""
        from mtrl.config.worker import FSDPConfig
        from mtrl.workers.fsdp_worker import build_fsdp_model

        self.init_distributed()
        model = build_fsdp_model(model_path, fsdp=FSDPConfig(mixed_precision_dtype="fp32"), device_type="cpu",
                                 trainable=True, padding_free=True)
        agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=1),
                                    model, torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=0.1))

        def weights():
            return [p.full_tensor().clone() for p in model.parameters()]

        def update():
            metrics = agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=len(batch))
            return {k: v for k, v in metrics.items() if "skipped" in k or k == "actor/grad_norm"}

        start = weights()
        nan_metrics = update()
        after_nan = weights()
        batch.tensors["advantages"] = torch.nan_to_num(batch.tensors["advantages"], nan=0.5)
        finite_metrics = update()
        return {"nan": nan_metrics, "finite": finite_metrics,
                "unchanged": all(torch.equal(a, b) for a, b in zip(start, after_nan)),
                "changed": any(not torch.equal(a, b) for a, b in zip(after_nan, weights())),
                "grads_left": sum(p.grad is not None for p in model.parameters())}


@pytest.fixture(scope="module")
def batch():
    task, model_path = shapes_task(), tiny_vl_model()
    tokenizer, processor = load_processor(model_path)
    data = SFTDataset(f"{task}/train.jsonl", tokenizer, processor, load_config(model_path), **dataset_kwargs(task))
    rows = data.collate([data[i] for i in range(ROWS)])
    mask = rows.tensors["response_mask"]
    g = torch.Generator().manual_seed(0)
    policy = load_policy(model_path)
    agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False), policy, torch.device("cpu"))
    old = agent.compute_log_probs(rows, 1.0)["log_probs"]
    # Half the rows are RL rows (old log-probs slightly off the current policy, random advantages, a TPRL
    # token mask), half expert rows: both loss paths of the update at once.
    rows.tensors.update(old_log_probs=old + 0.05 * torch.randn(old.shape, generator=g) * mask,
                        advantages=torch.randn(ROWS, 1, generator=g).expand_as(old).clone() * mask,
                        token_mask=(torch.rand(old.shape, generator=g) > 0.3).float(),
                        is_expert=torch.tensor([0.0, 1.0] * (ROWS // 2)))
    rows.meta.update(chord_mu=0.4)
    return rows, model_path


@pytest.fixture(scope="module")
def workers():
    from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, init_ray

    init_ray(num_cpus=4)
    group = RayWorkerGroup(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(ShardedGradientWorker),
                           name_prefix="grad")
    yield group
    group.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
def test_sharded_gradient_equals_unsharded_gradient(batch, workers, loss_agg_mode):
    rows, model_path = batch
    per_rank = workers.gradients(rows, model_path, loss_agg_mode)
    assert per_rank[0]["sharded"] > 0  # the weights really were split over the two ranks
    expected = update_gradients(load_policy(model_path), rows, loss_agg_mode, micro_batch=ROWS)
    assert expected.keys() == per_rank[0]["grads"].keys()
    total = torch.sqrt(sum((g ** 2).sum() for g in expected.values()))
    assert total > 0
    for name, grad in expected.items():
        for rank in per_rank:
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-7 * float(total),
                                       msg=f"{loss_agg_mode}: {name}")


def test_non_finite_gradient_on_one_rank_skips_the_step_on_both(batch, workers):
    rows, model_path = batch
    rows = rows.index(list(range(ROWS)))  # a copy: the module's batch stays clean
    advantages = rows.tensors["advantages"].clone()
    advantages[ROWS // 2] = float("nan")  # an RL row of rank 1's half only
    rows.tensors["advantages"] = advantages
    per_rank = workers.nan_then_finite_update(rows, model_path)
    for rank in per_rank:
        # Rank 0's own loss was finite: the norm over all shards is not, so it skipped with rank 1.
        assert rank["unchanged"] and rank["grads_left"] == 0
        assert rank["nan"]["actor/skipped_updates"] == 1.0 and rank["nan"]["actor/skipped_updates_in_a_row"] == 1.0
        assert not math.isfinite(rank["nan"]["actor/grad_norm"])
        # The next, finite, update steps on both ranks and ends the run of skips.
        assert rank["changed"] and math.isfinite(rank["finite"]["actor/grad_norm"])
        assert rank["finite"]["actor/skipped_updates"] == 0.0
        assert rank["finite"]["actor/skipped_updates_in_a_row"] == 0.0
