"""The config the workers receive, filled in on the driver from the root config (as EasyR1 copies algorithm
settings into its worker config): workers never see `MTRLConfig`."""

import copy

from mtrl.config.worker import WorkerRunConfig
from mtrl.training.training_config import MTRLConfig


def build_worker_run_config(config: MTRLConfig) -> WorkerRunConfig:
    worker = copy.deepcopy(config.worker)
    worker.rollout.max_new_tokens = worker.rollout.max_new_tokens or config.dataset.max_response_length
    worker.rollout.max_model_len = worker.rollout.max_model_len or \
        config.dataset.max_prompt_length + worker.rollout.max_new_tokens
    # The critic starts from the policy's weights unless it names its own model.
    worker.critic.model.model_path = worker.critic.model.model_path or worker.actor.model.model_path
    return WorkerRunConfig(worker=worker, optimization=config.optimization, seed=config.training.seed)
