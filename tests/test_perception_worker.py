"""The actor worker's TPRL perception pass itself, on a one-rank FSDP2 worker (gloo, in this process):
perturbed log-probs differ from the clean ones, the visual dependency is positive, a briefly SFT-trained
model's answer tokens depend on the image more than its template tokens, for Qwen2-VL, Qwen2.5-VL and
Qwen3-VL (whose 16-pixel patch the default `perception_patch_size` follows)."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mtrl.models.tiny import ensure_tiny_model
from mtrl.optimization.tprl import compute_visual_dependency
from mtrl.single_controller.base.worker import find_free_port
from mtrl.training.training_config import load_config
from mtrl.training.worker_run_config import build_worker_run_config
from mtrl.utils.dataset import build_dataloader, build_dataset
from mtrl.utils.errors import UserError
from mtrl.utils.sft_dataset import build_sft_dataset
from mtrl.utils.shapes_task import task_corpus
from mtrl.workers.actor.actor_worker import PERCEPTION_INPUTS, ActorRolloutRefWorker
from shapes_assets import assets_root, shapes_task


@pytest.fixture(scope="module")
def process_group():
    """Rank 0 of a group of one, joined by the first worker's set-up; torn down after the module."""
    mp = pytest.MonkeyPatch()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        mp.delenv(key, raising=False)
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    mp.setenv("MASTER_PORT", str(find_free_port("127.0.0.1")))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    mp.undo()


def tiny(arch: str) -> str:
    return ensure_tiny_model(os.path.join(assets_root(), f"tiny_{arch}"), arch=arch, corpus=task_corpus("easy"))


def config_for(arch: str, *overrides: str):
    task = shapes_task()
    return load_config([
        "stages=[]", f"dataset.train_files={task}/train.jsonl", f"dataset.image_dir={task}",
        "dataset.min_pixels=3136", "dataset.max_pixels=3136", "dataset.max_prompt_length=96",
        "dataset.max_response_length=6", "dataset.rollout_batch_size=16", "worker.actor.global_batch_size=16",
        "worker.rollout.n=2", "worker.actor.fsdp.mixed_precision_dtype=fp32", "worker.actor.optim.lr=2e-3",
        "worker.actor.optim.weight_decay=0.0", "worker.actor.model.enable_gradient_checkpointing=false",
        f"worker.actor.model.model_path={tiny(arch)}", "optimization.enable_perception_filtering=true",
        "training.device=cpu", *overrides])


def start_worker(config) -> ActorRolloutRefWorker:
    worker = ActorRolloutRefWorker(build_worker_run_config(config), with_ref=False, with_optimizer=True)
    worker.init_model(total_training_steps=100)
    return worker


def with_sample_uids(batch, step: int = 1):
    """What the controller adds after generation: a uid per response, the step and the temperature."""
    counts = {}
    uids = []
    for uid in batch.non_tensors["uid"]:
        uids.append(f"{uid}/{counts.get(uid, 0)}")
        counts[uid] = counts.get(uid, 0) + 1
    batch.non_tensors["sample_uid"] = np.array(uids, dtype=object)
    batch.meta.update(global_step=step, temperature=1.0)
    return batch


def rollout(worker, config, prompts: int = 4):
    d = config.dataset
    data = build_dataset(d.train_files, d, worker.tokenizer, worker.processor, worker.model_config)
    batch = next(iter(build_dataloader(data, prompts, shuffle=False)))
    batch.meta.update(global_step=1, n=2, temperature=1.0)
    return with_sample_uids(worker.generate_sequences(batch))


def dependency(worker, batch):
    """Clean and perturbed log-probs, the perturbed ones from only the columns the controller sends the pass."""
    clean = worker.compute_log_probs(batch).tensors["old_log_probs"]
    perturbed = worker.compute_perception(batch.select(PERCEPTION_INPUTS)).tensors["aug_log_probs"]
    mask = batch.tensors["response_mask"]
    return clean, perturbed, compute_visual_dependency(clean, perturbed, mask), mask.bool()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_perception_pass_changes_the_log_probs(process_group, arch):
    config = config_for(arch)
    assert config.optimization.perception_patch_size is None  # the model's own patch: 14, or 16 for Qwen3-VL
    worker = start_worker(config)
    batch = rollout(worker, config)
    clean, perturbed, scores, mask = dependency(worker, batch)
    assert mask.sum() > 0
    assert not torch.allclose(clean[mask], perturbed[mask])
    assert float(scores[mask].mean()) > 0
    assert torch.equal(scores[~mask], torch.zeros_like(scores[~mask]))
    # The perturbation is seeded per response: the same pass again (on the whole batch) gives the same log-probs.
    assert torch.equal(worker.compute_perception(batch).tensors["aug_log_probs"], perturbed)


def test_perception_patch_size_not_on_the_patch_grid_fails_in_the_worker(process_group):
    worker = start_worker(config_for("qwen3_vl", "optimization.perception_patch_size=28"))  # 28: Qwen2-VL's cell
    with pytest.raises(UserError, match="multiple of the model's vision patch size 16"):
        worker.compute_perception(rollout(worker, config_for("qwen3_vl"), prompts=1))


def test_answer_tokens_depend_on_the_image_more_than_template_tokens(process_group):
    """After a brief SFT on a fixed batch of the shapes task (the same question has different answers, so
    only the image tells them apart), the perturbation moves the answer word's log-prob much more than that
    of the end-of-turn token after it."""
    config = config_for("qwen2_vl", "worker.actor.optim.lr=5e-3")
    worker = start_worker(config)
    d = config.dataset
    sft = build_sft_dataset(d.train_files, d, worker.tokenizer, worker.processor, worker.model_config)
    rows = with_sample_uids(next(iter(build_dataloader(sft, 8, shuffle=False))), step=100)
    losses = []
    for step in range(1, 31):
        rows.meta.update(global_step=step, chord_mu=1.0, chord_phi=False, temperature=1.0, n=1,
                         samples_per_mini_batch=8)
        losses.append(worker.update_actor(rows)["expert/sft_loss"])
    rows.meta.update(global_step=100)
    _, _, scores, mask = dependency(worker, rows)
    last = mask.long().cumsum(-1).argmax(-1)  # the end-of-turn token closing each answer
    template = torch.zeros_like(mask)
    template[torch.arange(len(mask)), last] = True
    answer = mask & ~template
    assert losses[-1] < 0.2 * losses[0]
    assert answer.sum() > 0
    assert float(scores[answer].mean()) > 20 * float(scores[template].mean())  # about 0.1 against 4e-4
