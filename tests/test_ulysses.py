"""Ulysses sequence parallelism (mtrl.models.ulysses): ulysses_size=2 gives the numbers of ulysses_size=1.

Two real Ray worker processes (gloo) shard one tiny model with FSDP2; on the same weights and the same
rows the actor's passes run once without sequence parallelism and once with both ranks in one Ulysses
group (each holding half of every sequence, all-to-all inside the attention): log-probs, entropies,
the update's full gradients (policy-gradient and SFT rows) and the critic's values must agree. Text
Qwen2, Qwen2-VL (images, mRoPE position ids) and Qwen3-VL (deepstack features), padding-free (packed) and
padded batches.
"""

import sys

import pytest
import torch

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.config.worker import ActorConfig
from mtrl.models.loader import load_config, load_processor
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch
from mtrl.single_controller.base import Dispatch, Worker, register
from mtrl.utils.sft_dataset import SFTDataset
from shapes_assets import assets_root, dataset_kwargs, shapes_task, tiny_vl_model

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules["shapes_assets"])

ROWS = 8


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
                    self.grads[self.names[id(p)]] = p.grad.full_tensor().detach().clone()


class UlyssesWorker(Worker):
    def _model(self, model_path: str, head: str = "lm", gradient_checkpointing: bool = False):
        from mtrl.config.worker import FSDPConfig
        from mtrl.workers.fsdp_worker import build_fsdp_model

        self.init_distributed()
        torch.manual_seed(0)  # the critic's fresh value head
        return build_fsdp_model(model_path, fsdp=FSDPConfig(mixed_precision_dtype="fp32"), device_type="cpu",
                                trainable=True, padding_free=True, head=head,
                                gradient_checkpointing=gradient_checkpointing)

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def actor_passes(self, batch: DataBatch, model_path: str, padding_free: bool,
                     gradient_checkpointing: bool = False) -> dict:
        """Log-probs, entropies and update gradients of this rank's rows, without and with a Ulysses group of 2."""
        from mtrl.models.ulysses import SequenceParallel

        from mtrl.models.loader import decoder_layers

        model = self._model(model_path, gradient_checkpointing=gradient_checkpointing)
        lengths = []  # the sequence lengths the decoder layers see
        decoder_layers(model)[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
        results = {}
        for size in (1, 2):
            lengths.clear()
            config = ActorConfig(padding_free=padding_free, dynamic_batching=False, max_grad_norm=1e9,
                                 micro_batch_size_per_device_for_update=2,
                                 micro_batch_size_per_device_for_experience=3)
            recorder = GradientRecorder(list(model.named_parameters()))
            agent = ParallelPolicyAgent(config, model, torch.device("cpu"), recorder, SequenceParallel.create(size))
            out = agent.compute_log_probs(batch, 1.0, return_entropy=True)
            metrics = agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=len(batch))
            results[size] = {**out, "grads": recorder.grads, "metrics": metrics, "lengths": list(lengths)}
        return results

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def critic_values(self, batch: DataBatch, model_path: str, padding_free: bool) -> dict:
        """The value model's values and gradient on the whole batch (both ranks), without and with Ulysses."""
        from mtrl.agents.parallel_policy_agent import use_sequence_parallel
        from mtrl.models.packing import forward_micro_batch
        from mtrl.models.ulysses import SequenceParallel

        model = self._model(model_path, head="value")
        tensors = {k: batch.tensors[k] for k in ("input_ids", "attention_mask", "position_ids", "responses")}
        results = {}
        for size in (1, 2):
            sp = use_sequence_parallel(model, SequenceParallel.create(size))
            with sp.active():
                values = forward_micro_batch(model, tensors, batch.non_tensors.get("multi_modal_inputs"),
                                             response_length=batch.tensors["responses"].shape[1],
                                             padding_free=padding_free, value_head=True)["values"]
            # Both ranks hold the whole loss either way (FSDP averages the two equal gradients).
            (values * batch.tensors["response_mask"]).sum().backward()
            score = next(p for n, p in model.named_parameters() if n.endswith("score.weight"))
            results[size] = {"values": values.detach(), "score_grad": score.grad.full_tensor().clone()}
            model.zero_grad(set_to_none=True)
        return results


    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def critic_update(self, batch: DataBatch, model_path: str, checkpointing: bool) -> dict:
        """The critic worker's update metrics on this rank's rows (one mini-batch), without and with Ulysses."""
        from mtrl.config.worker import CriticConfig, FSDPConfig, ModelConfig, WorkerConfig, WorkerRunConfig
        from mtrl.workers.critic.critic_worker import CriticWorker

        results = {}
        for size in (1, 2):
            critic = CriticConfig(model=ModelConfig(model_path=model_path, enable_gradient_checkpointing=checkpointing),
                                  fsdp=FSDPConfig(mixed_precision_dtype="fp32"), global_batch_size=len(batch) * 2,
                                  dynamic_batching=False, micro_batch_size_per_device_for_update=2)
            worker = CriticWorker(WorkerRunConfig(worker=WorkerConfig(actor=ActorConfig(ulysses_size=size),
                                                                      critic=critic)))
            worker.init_model()
            results[size] = worker._update_critic(batch)
        return results


def rl_columns(rows: DataBatch, seed: int = 0) -> DataBatch:
    """Old log-probs, advantages and a TPRL token mask, so the update runs the clipped policy loss."""
    mask = rows.tensors["response_mask"]
    g = torch.Generator().manual_seed(seed)
    rows.tensors.update(old_log_probs=-3.0 + 0.3 * torch.randn(mask.shape, generator=g) * mask,
                        advantages=torch.randn(len(rows), 1, generator=g).expand_as(mask).clone() * mask,
                        token_mask=(torch.rand(mask.shape, generator=g) > 0.3).float())
    return rows


def vl_batch(arch: str = "qwen2_vl") -> tuple:
    """Shapes-task rows with images (mRoPE position ids), half of them expert (SFT) rows."""
    from mtrl.models.tiny import ensure_tiny_model
    from mtrl.utils.shapes_task import task_corpus

    task = shapes_task()
    model_path = tiny_vl_model() if arch == "qwen2_vl" else \
        ensure_tiny_model(f"{assets_root()}/tiny_{arch}", arch=arch, corpus=task_corpus("easy"))
    tokenizer, processor = load_processor(model_path)
    data = SFTDataset(f"{task}/train.jsonl", tokenizer, processor, load_config(model_path), **dataset_kwargs(task))
    rows = rl_columns(data.collate([data[i] for i in range(ROWS)]))
    rows.tensors["is_expert"] = torch.tensor([0.0, 1.0] * (ROWS // 2))
    rows.meta.update(chord_mu=0.4)
    return rows, model_path


def text_batch() -> tuple:
    """Random Qwen2 rows: left-padded prompts of 3-9 tokens, right-padded responses of 1-6 (odd lengths,
    so the split pads the sequence)."""
    from mtrl.models.tiny import ensure_tiny_model

    model_path = ensure_tiny_model(f"{assets_root()}/tiny_qwen2", arch="qwen2")
    g = torch.Generator().manual_seed(1)
    prompt_len, response_len = 9, 6
    ids = torch.randint(10, 500, (ROWS, prompt_len + response_len), generator=g)
    prompt_lens = torch.randint(3, prompt_len + 1, (ROWS,), generator=g)
    response_lens = torch.randint(1, response_len + 1, (ROWS,), generator=g)
    cols = torch.arange(prompt_len + response_len)
    prompt_mask = (cols[:prompt_len] >= prompt_len - prompt_lens[:, None])
    response_mask = (cols[:response_len] < response_lens[:, None])
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = DataBatch(tensors={"input_ids": ids * attention_mask, "attention_mask": attention_mask,
                              "position_ids": position_ids, "responses": (ids * attention_mask)[:, prompt_len:],
                              "response_mask": response_mask.float()})
    return rl_columns(rows), model_path


# Qwen3-VL adds its deepstack image features inside the decoder: they are sliced with the sequence.
BATCHES = {"qwen2": text_batch, "qwen2_vl": vl_batch, "qwen3_vl": lambda: vl_batch("qwen3_vl")}


@pytest.fixture(scope="module")
def workers():
    from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, init_ray

    init_ray(num_cpus=4)
    group = RayWorkerGroup(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(UlyssesWorker),
                           name_prefix="ulysses")
    yield group
    group.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("arch,padding_free,checkpointing", [
    ("qwen2", True, False), ("qwen2", False, False), ("qwen2_vl", True, False), ("qwen2_vl", False, False),
    ("qwen3_vl", True, False), ("qwen3_vl", False, False),
    ("qwen2_vl", True, True),  # gradient checkpointing recomputes the layers: the sp kwargs come along
], ids=["qwen2-packed", "qwen2-padded", "qwen2_vl-packed", "qwen2_vl-padded", "qwen3_vl-packed",
        "qwen3_vl-padded", "qwen2_vl-packed-checkpointing"])
def test_actor_passes_equal_without_sequence_parallelism(workers, arch, padding_free, checkpointing):
    rows, model_path = BATCHES[arch]()
    per_rank = workers.actor_passes(rows, model_path, padding_free, checkpointing)
    mask = rows.tensors["response_mask"]
    # With Ulysses each rank's layers saw half (rounded up) of every micro-batch of both ranks.
    halves = {(length + 1) // 2 for result in per_rank for length in result[1]["lengths"]}
    for rank, result in enumerate(per_rank):
        plain, split = result[1], result[2]
        assert len(split["lengths"]) == 2 * len(plain["lengths"]) and set(split["lengths"]) == halves
        torch.testing.assert_close(split["log_probs"], plain["log_probs"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split["entropy"], plain["entropy"], rtol=1e-5, atol=1e-5)
        assert plain["log_probs"].shape == (ROWS // 2, mask.shape[1])
        assert bool((plain["log_probs"][mask[rank * ROWS // 2:(rank + 1) * ROWS // 2] > 0] < 0).all())
        assert plain["grads"].keys() == split["grads"].keys()
        total = torch.sqrt(sum((g ** 2).sum() for g in plain["grads"].values()))
        assert total > 0
        for name, grad in plain["grads"].items():
            torch.testing.assert_close(split["grads"][name], grad, rtol=1e-4, atol=1e-6 * float(total), msg=name)
        for key, value in plain["metrics"].items():
            assert split["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("padding_free", [True, False], ids=["packed", "padded"])
def test_critic_values_equal_without_sequence_parallelism(workers, padding_free):
    rows, model_path = vl_batch()
    for result in workers.critic_values(rows, model_path, padding_free):
        torch.testing.assert_close(result[2]["values"], result[1]["values"], rtol=1e-5, atol=1e-5)
        assert float(result[1]["values"].abs().sum()) > 0
        torch.testing.assert_close(result[2]["score_grad"], result[1]["score_grad"], rtol=1e-4, atol=1e-6)


# The quickstart's RL step with a critic (GAE) and a divergence loss to the reference: all three models
# run their passes sequence-parallel.
E2E_OVERRIDES = ("optimization.advantage_estimator=gae", "optimization.disable_divergence=false",
                 "optimization.use_divergence_loss=true", "optimization.divergence_penalty=low_var_kl",
                 "worker.critic.fsdp.mixed_precision_dtype=fp32")  # as the actor: bf16 rounding is not the test
E2E_COMPARED = ("actor/pg_loss", "actor/entropy", "actor/divergence_loss", "actor/grad_norm", "critic/vf_loss",
                "critic/grad_norm", "reward/overall", "response_length/mean", "val/reward_score")


# Step 1 (and validation before it) runs on the same weights: equal to float rounding. Step 2 follows one
# Adam step, which is close to lr * sign(gradient) and so turns rounding-level differences of near-zero
# gradient entries into lr-sized weight differences (as in tests/test_worker_count_invariance.py).
E2E_TOLERANCE = {1: dict(rel=1e-5, abs=1e-6), 2: dict(rel=1e-3, abs=2e-4)}


@pytest.mark.slow
def test_rl_run_with_ulysses_on_two_workers_equals_without(tmp_path):
    from test_end_to_end import run_cli

    _, plain = run_cli(tmp_path, "plain", *E2E_OVERRIDES, steps=2)
    _, split = run_cli(tmp_path, "ulysses", "worker.actor.ulysses_size=2", *E2E_OVERRIDES, steps=2)
    assert [r["step"] for r in split] == [r["step"] for r in plain]
    compared = 0
    for a, b in zip(plain, split):
        for key in E2E_COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], **E2E_TOLERANCE[max(a["step"], 1)]), (a["step"], key)
                compared += 1
    assert compared >= 2 * 7


@pytest.mark.parametrize("overrides,pattern", [
    (["worker.actor.ulysses_size=0"], r"`worker.actor.ulysses_size` = 0 must be > 0"),
    (["worker.actor.ulysses_size=3"], r"`worker.actor.ulysses_size` = 3 must divide the 2 workers"),
    (["worker.actor.ulysses_size=2", "training.mode=dpo", "dataset.preference_files=pairs.jsonl"],
     r"sequence parallelism runs in the actor, reference and critic .*not in training.mode = dpo"),
])
def test_config_rejects_a_ulysses_size_it_cannot_run(overrides, pattern):
    from mtrl.training.training_config import ConfigError, load_config

    base = ["dataset.train_files=train.jsonl", "optimization.advantage_estimator=grpo", "worker.rollout.n=2",
            "dataset.rollout_batch_size=8", "worker.actor.global_batch_size=4", "training.n_gpus_per_node=2"]
    with pytest.raises(ConfigError, match=pattern):
        load_config([*base, *overrides])


def test_config_rejects_a_ulysses_size_that_does_not_divide_the_heads(capsys):
    """The tiny model has 4 query and 2 key-value heads: 4 ranks per group cannot split the key-value heads."""
    from mtrl.training.training_main import main

    code = main(["dataset.train_files=train.jsonl", "optimization.advantage_estimator=grpo", "worker.rollout.n=2",
                 "dataset.rollout_batch_size=8", "worker.actor.global_batch_size=4", "training.n_gpus_per_node=4",
                 f"worker.actor.model.model_path={tiny_vl_model()}", "worker.actor.ulysses_size=4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "`worker.actor.ulysses_size` = 4 must divide the model's attention heads (4 query, 2 key-value" in err


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_critic_update_equals_without_sequence_parallelism(workers, checkpointing):
    rows, model_path = vl_batch()
    g = torch.Generator().manual_seed(3)
    mask = rows.tensors["response_mask"]
    rows.tensors.update(values=0.1 * torch.randn(mask.shape, generator=g) * mask,
                        returns=torch.randn(mask.shape, generator=g) * mask)
    for result in workers.critic_update(rows, model_path, checkpointing):
        assert result[1]["critic/grad_norm"] > 0
        for key in ("critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm"):
            assert result[2][key] == pytest.approx(result[1][key], rel=1e-5, abs=1e-7), key
