"""Every rank runs the same number of optimizer steps: the training loaders drop an epoch's last partial
batch (shuffled or not) and the dispatch order refuses a batch that cannot be split evenly."""

import pytest
import torch

from mtrl.protocol import DataBatch
from mtrl.training.training_config import load_config
from mtrl.training.trainer_base import Trainer
from mtrl.utils.seqlen_balancing import update_layout
from mtrl.utils.shapes_task import write_preference_pairs
from shapes_assets import shapes_task, tiny_vl_model


def _config(tmp_path, mode, files_key, files):
    (tmp_path / "reward.py").write_text("def reward_function(data):\n    return 0.0\n")
    return load_config([
        "stages=[]", f"training.mode={mode}", f"dataset.{files_key}={files}", f"dataset.image_dir={shapes_task()}",
        "dataset.min_pixels=3136", "dataset.max_pixels=3136", "dataset.max_prompt_length=96",
        "dataset.rollout_batch_size=64", "dataset.shuffle=false", "training.device=cpu", "training.logger=[file]",
        f"training.save_checkpoint_path={tmp_path / 'run'}", "training.n_gpus_per_node=8",
        "worker.actor.global_batch_size=32", "worker.rollout.n=2", f"worker.reward.reward_fn_path={tmp_path}/reward.py",
        f"worker.actor.model.model_path={tiny_vl_model()}"])


@pytest.mark.parametrize("mode", ["rl", "sft", "dpo"])
def test_unshuffled_training_drops_the_last_partial_batch(tmp_path, mode):
    from mtrl.training.stages import trainer_class

    task = shapes_task()  # 300 training rows: 4 batches of 64 and 44 left over
    pairs = str(tmp_path / "pairs.jsonl")
    files_key, files = {"rl": ("train_files", f"{task}/train.jsonl"), "sft": ("sft_files", f"{task}/train.jsonl"),
                        "dpo": ("preference_files", pairs)}[mode]
    if mode == "dpo":
        write_preference_pairs(task, out_path=pairs)
    config = _config(tmp_path, mode, files_key, files)
    trainer = trainer_class(config)(config)
    rows = trainer.config.dataset.rollout_batch_size
    n_rows = len(trainer.train_loader.dataset)
    assert n_rows % rows != 0
    assert len(trainer.train_loader) == n_rows // rows
    assert [len(b) for b in trainer.train_loader] == [rows * (2 if mode == "dpo" else 1)] * (n_rows // rows)
    assert trainer.total_steps == n_rows // rows * config.training.total_epochs
    trainer.shutdown()


def test_update_layout_refuses_a_batch_that_does_not_split_evenly():
    lengths = [5] * 68 * 2  # the short last batch of the review: 68 prompts x n=2 over 8 workers, mini-batch 128
    with pytest.raises(ValueError, match="8 workers"):
        update_layout(lengths, 128, 8)
    assert sorted(update_layout([5] * 256, 128, 8)) == list(range(256))


def test_rank_order_refuses_an_uneven_batch():
    trainer = object.__new__(Trainer)
    trainer.config = load_config(["training.n_gpus_per_node=8", "dataset.rollout_batch_size=64",
                                  "worker.actor.global_batch_size=32", "dataset.train_files=x.jsonl"])
    batch = DataBatch({"attention_mask": torch.ones(68 * 2, 4, dtype=torch.long)}, {}, {})
    with pytest.raises(ValueError):
        trainer._rank_order(batch, 64)
