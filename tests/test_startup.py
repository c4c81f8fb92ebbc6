"""Start-up: the RL trainer's worker processes start from the config before the trainer is built
(`Trainer.start_workers`, `RayWorkerGroup.start`), and a trainer that cannot be built leaves no actor behind."""

import time

import pytest

from mtrl.single_controller.ray import init_ray
from mtrl.training.distributed_trainer import DistributedTrainer
from mtrl.training.stages import trainer_class
from mtrl.training.trainer_base import run_training
from mtrl.training.training_config import load_config
from shapes_assets import shapes_task, tiny_vl_model

ray = pytest.importorskip("ray")


def _wait_released(cpus: float) -> bool:
    """Whether, within 30 s, no mtrl actor is alive and the CPUs are all available again."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if not [n for n in ray.util.list_named_actors() if n.startswith("mtrl_")] and \
                ray.available_resources().get("CPU", 0) == cpus:
            return True
        time.sleep(0.2)
    return False


def test_a_trainer_that_cannot_be_built_stops_the_workers_started_for_it(tmp_path, monkeypatch, capsys):
    started = []

    def spy(cls, config):
        starting = real(config)
        started.append((starting, list(starting.actors)))
        return starting

    real = DistributedTrainer.start_workers
    monkeypatch.setattr(DistributedTrainer, "start_workers", classmethod(spy))
    config = load_config([
        "stages=[]", f"dataset.train_files={tmp_path}/missing.jsonl", f"dataset.image_dir={shapes_task()}",
        "dataset.rollout_batch_size=4", "training.device=cpu", "training.logger=[file]",
        f"training.save_checkpoint_path={tmp_path / 'run'}", "training.n_gpus_per_node=1",
        "worker.actor.global_batch_size=4", "worker.rollout.n=2",
        f"worker.actor.model.model_path={tiny_vl_model()}"])
    init_ray(num_cpus=4)  # as between stages: run_training leaves Ray up
    try:
        cpus = ray.cluster_resources()["CPU"]
        assert run_training(config, trainer_class(config)) == 2
        assert "missing.jsonl" in capsys.readouterr().err and ray.is_initialized()
        (starting, actors), = started
        assert len(actors) == 1  # rank 0 created before the trainer was built ...
        with pytest.raises(ray.exceptions.RayActorError):  # ... and stopped with its placement group
            ray.get(actors[0].__ray_ready__.remote(), timeout=60)
        assert starting.pool._placement_groups is None and _wait_released(cpus)
    finally:
        ray.shutdown()
