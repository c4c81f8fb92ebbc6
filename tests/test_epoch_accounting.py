"""The fit loop's epoch follows the data loader when a step draws extra prompts (online filtering's
`_next_prompts`): `training/epoch` is the epoch of the step's batch and no more than `total_epochs`
epochs of data are consumed."""

from mtrl.training.distributed_trainer import DistributedTrainer
from mtrl.training.signals import StopFlag
from mtrl.training.trainer_base import total_steps
from mtrl.training.training_config import load_config
from mtrl.utils.dataset import StatefulDataLoader


class Rows:
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"index": i}

    @staticmethod
    def collate(items):
        return [item["uid"] for item in items]


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append({"step": step, **metrics})


class ExtraPromptsTrainer(DistributedTrainer):
    """The RL loop with each step drawing one batch of extra prompts, as online filtering does when it
    keeps too few groups; no workers: a step only records which prompts it saw."""

    def __init__(self, config):
        self.config, self.export_dir, self.run_dir = config, None, config.training.run_dir
        self.train_loader = StatefulDataLoader(Rows(), batch_size=2, shuffle=False, drop_last=True)
        self.val_loader = None
        self.total_steps = total_steps(self.train_loader, config.training)
        self.tracker, self.global_step, self.timing, self.stop = Recorder(), 0, {}, StopFlag()
        self.steps = []

    def init_workers(self):
        pass

    def resume(self):
        return None

    def save_checkpoint(self):
        return None

    def train_step(self, batch):
        self.steps.append(list(batch) + list(self._next_prompts()))
        return {}


def test_extra_prompts_advance_the_epoch_counter(tmp_path):
    config = load_config(["dataset.train_files=x.jsonl", "training.total_epochs=2", "training.save_freq=-1",
                          f"training.save_checkpoint_path={tmp_path}", "training.n_gpus_per_node=2",
                          "dataset.rollout_batch_size=2", "worker.actor.global_batch_size=2", "worker.rollout.n=2"])
    trainer = ExtraPromptsTrainer(config)
    trainer.fit()
    consumed = [uid for step in trainer.steps for uid in step]
    # Two epochs of 10 rows, each step taking 4 of them: every row of both epochs once, then the data is spent.
    assert sorted(consumed) == sorted(f"{e}-{i}" for e in range(2) for i in range(10))
    assert len(trainer.steps) == 5
    epochs = [row["training/epoch"] for row in trainer.tracker.rows]
    assert epochs == [int(step[0].split("-")[0]) for step in trainer.steps] == [0, 0, 0, 1, 1]
