"""Shared test assets for the SFT / CHORD / DPO / reward-model tests: the built-in shapes task (small) and a
tiny Qwen2-VL whose tokenizer knows the task's words, built once per test session into a temporary folder."""

import os
import tempfile

import torch

_ROOT = None

# A reward file's text with signal for an untrained model (it varies over the responses of one prompt),
# so that the policy-gradient terms are not all zero.
TEXT_VARYING_REWARD = '''
def reward_function(data_dict):
    response = str(data_dict.get("response") or "")
    return (len(response) * 7 + sum(map(ord, response))) % 5 / 4.0
'''


def assets_root() -> str:
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="mtrl_shapes_assets_")
    return _ROOT


def shapes_task(n_train: int = 300, n_val: int = 100) -> str:
    from mtrl.utils.shapes_task import ensure_task

    return ensure_task(os.path.join(assets_root(), "shapes"), n_train=n_train, n_val=n_val, seed=0, difficulty="easy")


def tiny_vl_model() -> str:
    from mtrl.models.tiny import ensure_tiny_model
    from mtrl.utils.shapes_task import task_corpus

    return ensure_tiny_model(os.path.join(assets_root(), "tiny_qwen2_vl"), arch="qwen2_vl", corpus=task_corpus("easy"))


def dataset_kwargs(task_dir: str) -> dict:
    return dict(image_dir=task_dir, min_pixels=3136, max_pixels=3136, max_prompt_length=96)


def load_policy(path: str, for_value: bool = False):
    from mtrl.models.attention import enable_padding_free_attention
    from mtrl.models.loader import load_model

    torch.manual_seed(0)
    model = load_model(path, for_value=for_value)
    enable_padding_free_attention(model)
    return model
