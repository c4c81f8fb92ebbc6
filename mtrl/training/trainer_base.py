"""The trainer skeleton every training mode shares: set-up, the fit loop, checkpoints, export, shutdown.

    Trainer.start_workers(config)        (run_training) worker processes started from the config, if it can:
                                         they start while the trainer is built
    Trainer(config, export_dir)          run folder, tokenizer / processor, data loaders, tracker
      fit()                              init_workers -> resume -> [validate] -> for each step:
                                         train_step, validate / save at their frequencies, log,
                                         stop on a signal -> export at the end
      shutdown()                         tracker, workers

A trainer supplies only what differs: its data (`build_train_loader`, `build_val_loader`), its workers
(`start_workers`, `init_workers`, `worker_groups`: the groups whose state a checkpoint holds, by role), `train_step`,
`validate`, `export`, and extra controller state (`state_dict` / `load_state_dict`). The RL trainer
(distributed_trainer.py), SFT (sft.py), CHORD (chord.py) and DPO / reward model (preference.py) do.

Checkpoints (mtrl/training/checkpointing.py) hold the worker groups' sharded state and this trainer's
`state_dict()`: the global step, the data-loader position, the controller RNG, plus what a subclass adds
(the divergence and entropy-bonus controllers of RL).

Signals: under `run_training`, SIGTERM / SIGINT ask the loop to stop after the current step (see
mtrl/training/signals.py); it then saves a checkpoint (`training.save_on_signal`) unless that step was
just saved, and the run exits with 128 + the signal number.

A worker process that dies mid-step (OOM killer, SIGKILL): the worker group stops its other workers and raises
`WorkerDiedError` (mtrl/single_controller); `run_training` prints it with the last checkpoint and how to
resume, and the run exits 1.
"""

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mtrl.agents.optimizer_step import stop_after_skipped_updates
from mtrl.models.loader import load_config as load_model_config
from mtrl.models.loader import load_processor
from mtrl.protocol import DataBatch
from mtrl.training import checkpointing
from mtrl.training.builtin_assets import ensure_builtin_assets
from mtrl.training.paths import absolutize_paths
from mtrl.training.signals import StopFlag, StopRequested, stop_on_signals
from mtrl.training.training_config import MTRLConfig, TrainingConfig, config_to_yaml, to_plain_dict
from mtrl.utils.checkpoint import read_meta, rng_state, set_rng_state
from mtrl.utils.dataset import build_dataloader
from mtrl.utils.errors import UserError
from mtrl.utils.faults import crash_point
from mtrl.utils.logger import get_logger
from mtrl.utils.seqlen_balancing import partition_stats, update_layout
from mtrl.utils.tracking import Tracker

logger = get_logger(__name__)


def open_run(config: MTRLConfig):
    """Create the run directory with the resolved config; load the tokenizer, processor and model config."""
    os.makedirs(config.training.run_dir, exist_ok=True)
    with open(os.path.join(config.training.run_dir, "config.yaml"), "w") as f:
        f.write(config_to_yaml(config))
    model_cfg = config.worker.actor.model
    # The model first: a wrong model_path is then reported as the model's, not as a missing tokenizer.
    model_config = load_model_config(model_cfg.model_path, trust_remote_code=model_cfg.trust_remote_code)
    tokenizer, processor = load_processor(model_cfg.tokenizer_path or model_cfg.model_path)
    return tokenizer, processor, model_config


def uses_gpu(training: TrainingConfig) -> bool:
    return training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available())


def total_steps(train_loader, training: TrainingConfig) -> int:
    """Batches per epoch x epochs, capped by `max_steps`; 0 without training data (val_only)."""
    if train_loader is None:
        return 0
    steps = len(train_loader) * training.total_epochs
    return min(steps, training.max_steps) if training.max_steps else steps


class Trainer:
    def __init__(self, config: MTRLConfig, export_dir: Optional[str] = None):
        self.config = config
        self.export_dir = export_dir  # where `fit` writes the trained model as a Hugging Face folder, if set
        self.run_dir = config.training.run_dir
        self.tokenizer, self.processor, self.model_config = open_run(config)
        self.val_loader = self.build_val_loader()
        self.train_loader = None if config.training.val_only else self.build_train_loader()
        self.total_steps = total_steps(self.train_loader, config.training)
        # Known before any worker starts, so the trackers continue the crashed run's logs (mtrl/utils/tracking.py).
        resume_from = checkpointing.resolve_resume_path(config.training, self.run_dir)
        self.tracker = Tracker(config.training.logger, config.training.project_name,
                               config.training.experiment_name, self.run_dir, to_plain_dict(config),
                               total_steps=self.total_steps,
                               resume_step=int(read_meta(resume_from)["global_step"]) if resume_from else None)
        self.checkpoints = checkpointing.CheckpointManager(config)
        self.global_step = 0
        self.timing: Dict[str, float] = {}
        self.stop = StopFlag()  # run_training gives it the one its signal handlers set
        self.starting_workers = None  # run_training gives it what `start_workers` started; init_workers takes it

    # ------------------------------------------------------------------ what a trainer supplies

    def build_train_loader(self):
        raise NotImplementedError

    def build_val_loader(self):
        return None

    def train_dataloader(self, dataset):
        """Batches of `dataset.rollout_batch_size` rows for training. An epoch's last partial batch is dropped,
        shuffled or not: a full batch is whole mini-batches (`global_batch_size` divides it) that split evenly
        over the workers (checked at config time), so every rank runs the same number of optimizer steps. A
        short batch would give some ranks one step fewer, and FSDP would hang on the others' collectives."""
        d = self.config.dataset
        return build_dataloader(dataset, d.rollout_batch_size, shuffle=d.shuffle, seed=d.seed, drop_last=True)

    @classmethod
    def start_workers(cls, config: MTRLConfig):
        """Start this trainer's worker group from the config alone, without waiting for it (a StartingWorkerGroup,
        mtrl/single_controller/ray), so that its processes start (Python, torch, the model's code: seconds) while
        the trainer plans the memory, loads the tokenizer and builds the datasets; None where the group needs the
        trainer (init_workers then starts it)."""
        return None

    def init_workers(self) -> None:
        raise NotImplementedError

    def worker_groups(self) -> Dict[str, Any]:
        """The worker groups a checkpoint holds, by role (its folder name); "actor" comes first."""
        raise NotImplementedError

    def train_step(self, batch) -> Dict[str, float]:
        raise NotImplementedError

    def validate(self) -> Dict[str, float]:
        return {}

    def export(self, path: str) -> None:
        self.worker_groups()["actor"].export_hf(path)

    def shutdown_workers(self) -> None:
        """Stop the workers (a subclass: its groups, after this); here the group started for it but not yet taken."""
        starting, self.starting_workers = self.starting_workers, None
        if starting is not None:
            starting.shutdown()

    # ------------------------------------------------------------------ controller state

    def state_dict(self) -> Dict[str, Any]:
        """What the controller needs to continue exactly: the step, the data position, the RNG it draws from."""
        return {"global_step": self.global_step,
                "dataloader": self.train_loader.state_dict() if self.train_loader is not None else None,
                "rng": rng_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        if self.train_loader is not None and state.get("dataloader"):
            self.train_loader.load_state_dict(state["dataloader"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Dict[str, float]:
        t = self.config.training
        self.init_workers()
        resumed = self.resume()
        last_val: Dict[str, float] = {}
        if self.val_loader is not None and (t.val_before_train or t.val_only):
            last_val = self.validate()
            self.tracker.log(last_val, step=self.global_step)
        if t.val_only:
            return last_val
        self._stop_if_asked(resumed)  # a signal during set-up: the resumed state is already on disk
        while not self._training_done():  # a resumed run continues its epoch
            for batch in self.train_loader:
                # The loader's epoch, not a loop counter: a step may draw further prompts (online filtering)
                # and so move the loader into the next epoch.
                epoch = self.train_loader.epoch
                self.global_step += 1
                metrics = self.train_step(batch)
                crash_point("step:after_train", self.global_step)
                last_step = self._training_done()
                if self.val_loader is not None and t.val_freq > 0 and (self.global_step % t.val_freq == 0
                                                                       or last_step):
                    last_val = self.validate()
                    metrics.update(last_val)
                metrics["training/epoch"] = epoch
                saved = None
                if checkpointing.should_save(t.save_freq, self.global_step, last_step):
                    with self._timer("save_checkpoint"):
                        saved = self.save_checkpoint()
                    metrics["timing/save_checkpoint"] = self.timing["timing/save_checkpoint"]
                self.tracker.log(metrics, step=self.global_step)
                stop_after_skipped_updates(metrics, t.max_skipped_updates, self.global_step)
                self._stop_if_asked(saved)
                if last_step:
                    break
        if self.export_dir:
            start = time.perf_counter()
            self.export(self.export_dir)
            print(f"[mtrl] exported the model to {self.export_dir} ({time.perf_counter() - start:.1f} s)")
        return last_val

    def _data_spent(self) -> bool:
        """`total_epochs` of training data handed out (steps that draw extra prompts spend it in fewer steps)."""
        return self.train_loader.state_dict()["epoch"] >= self.config.training.total_epochs

    def _training_done(self) -> bool:
        return self.global_step >= self.total_steps or self._data_spent()

    def save_checkpoint(self) -> str:
        return self.checkpoints.save(self.global_step, self.worker_groups(), self.state_dict())

    def resume(self) -> Optional[str]:
        """Continue from `training.load_checkpoint_path` / the run folder's last checkpoint, if any.
        val_only runs load the weights and the step only."""
        t = self.config.training
        found = self.checkpoints.load(self.worker_groups())
        if found is None:
            return None
        path, state = found
        if t.val_only:
            self.global_step = int(state["global_step"])
        else:
            self.load_state_dict(state)
            if self.global_step >= self.total_steps:
                logger.warning(f"the run already reached its last step ({self.total_steps}), so there is nothing "
                               f"left to train (raise training.max_steps / total_epochs, or set "
                               f"training.find_last_checkpoint=false or another training.save_checkpoint_path to "
                               f"start afresh)")
        return path

    def _stop_if_asked(self, saved: Optional[str]) -> None:
        """Between steps: on a stop signal, write a checkpoint (unless `saved` already holds this state) and stop."""
        if self.stop.signum is None:
            return
        path = saved
        if path is None and self.config.training.save_on_signal and self.global_step > 0:
            path = self.save_checkpoint()
        raise StopRequested(self.stop.signum, self.global_step, path)

    # ------------------------------------------------------------------ data-parallel dispatch

    def _dp(self, method, batch: DataBatch, order: Optional[List[int]] = None) -> DataBatch:
        """Call a data-parallel worker method with rows padded to a multiple of the world size.

        Every rank must run the same number of forward passes under FSDP, so every rank gets the
        same number of rows; the copies added for padding are dropped from the result. With `order`
        (from `_rank_order`) the rows are dispatched in that order and the result comes back in the
        batch's own order.
        """
        if order is not None:
            out = method(batch.index(order))
            return out if not isinstance(out, DataBatch) else out.index(np.argsort(order).tolist())
        world = self.config.training.world_size
        pad = -len(batch) % world
        if pad == 0:
            return method(batch)
        padded = DataBatch.concat([batch, batch.index([i % len(batch) for i in range(pad)])])
        out = method(padded)
        # Generation returns n rows per prompt, in prompt order, so the padding is still at the end.
        return out.index(slice(0, len(batch) * (len(out) // len(padded))))

    def _rank_order(self, batch: DataBatch, rows_per_mini_batch: int, group_size: int = 1,
                    metrics: Optional[Dict[str, float]] = None) -> List[int]:
        """The dispatch order that gives every rank its share of each update mini-batch (`update_layout`):
        mini-batch k is rows k * rows_per_mini_batch ... of the batch whatever the worker count, so the
        update does not depend on it. With dynamic batching each mini-batch is also token-balanced
        across ranks (`perf/rank_tokens_*` in `metrics`). Raises ValueError when the rows cannot be split
        evenly (the training loaders and the config checks rule that out)."""
        world = self.config.training.world_size
        lengths = batch.tensors["attention_mask"].sum(-1).tolist()
        balance = self.config.worker.actor.dynamic_batching
        order = update_layout(lengths, rows_per_mini_batch, world, group_size, balance=balance)
        if balance and metrics is not None:
            share = len(order) // world
            stats = partition_stats(lengths, [order[r * share:(r + 1) * share] for r in range(world)])
            metrics.update({f"perf/rank_tokens_{k}": float(v) for k, v in stats.items()})
        return order

    @contextmanager
    def _timer(self, name: str):
        start = time.perf_counter()
        yield
        self.timing[f"timing/{name}"] = time.perf_counter() - start

    def shutdown(self) -> None:
        self.tracker.finish()
        self.shutdown_workers()


# ------------------------------------------------------------------ entry


def _resume_hint(config: MTRLConfig) -> str:
    last = checkpointing.resolve_resume_path(config.training, config.training.run_dir)
    where = f"The last checkpoint, {last}, is intact" if last else "No checkpoint was written yet"
    return (f"{where}; to resume, run the same command again (training.find_last_checkpoint=true, the default, "
            f"continues from the run folder's last checkpoint)")


def run_training(config: MTRLConfig, trainer_cls, export_dir: Optional[str] = None) -> int:
    """Start Ray, train (or validate) with `trainer_cls(config, export_dir)`, shut Ray down (unless it was running
    already, e.g. between the stages of mtrl/training/stages.py). The trainer's workers start first, from the
    config (`Trainer.start_workers`), and are stopped if the trainer cannot be built. Returns the exit code: 0, 1
    when a worker process died (the message names it, the phase and how to resume), 2 for a user error,
    128 + signal number when SIGTERM / SIGINT stopped the run."""
    import ray

    from mtrl.single_controller import WorkerDiedError
    from mtrl.single_controller.ray import init_ray

    started_ray = not ray.is_initialized()
    init_ray(num_cpus=max(4, config.training.world_size + config.worker.reward.num_cpus + 1))
    trainer = starting = None
    try:
        with stop_on_signals() as stop:
            try:
                ensure_builtin_assets(config)
                absolutize_paths(config)
                starting = trainer_cls.start_workers(config)  # they start while the trainer is built
                from mtrl.tools.memory_plan import check_memory_at_startup  # noqa: PLC0415

                check_memory_at_startup(config, on_gpu=uses_gpu(config.training))
                trainer = trainer_cls(config, export_dir)
                trainer.stop = stop
                trainer.starting_workers, starting = starting, None  # the trainer's now (its shutdown stops them)
                final = trainer.fit()
            except StopRequested as stopped:
                print(f"mtrl: {stopped}", file=sys.stderr)
                return stopped.exit_code
            except UserError as e:
                print(f"mtrl: error: {e}", file=sys.stderr)
                return 2
            except WorkerDiedError as e:
                print(f"mtrl: error: {e}. {_resume_hint(config)}", file=sys.stderr)
                return 1
            finally:
                if starting is not None:  # the trainer was not built: nothing will use them
                    starting.shutdown()
                if trainer is not None:
                    trainer.shutdown()
                if started_ray:
                    ray.shutdown()
    except StopRequested as stopped:  # a second signal during the shutdown above
        print(f"mtrl: {stopped}", file=sys.stderr)
        return stopped.exit_code
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items()) if k.startswith("val/"))
    print(f"[mtrl] done. run directory: {trainer.run_dir} (metrics.jsonl, config.yaml)"
          + (f"; final validation: {summary}" if summary else ""))
    return 0
