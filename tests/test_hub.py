"""Hub ids in the config: which entries are Hub ids, and model ids resolved on the driver to a local snapshot
of the Hugging Face cache (a fake cache laid out as huggingface_hub's, HF_HUB_OFFLINE=1: no network here)."""

import json
import os
import re
import subprocess
import sys

import pytest

from mtrl.utils.hub import parse_dataset_id, parse_repo_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_which_entries_are_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_repo_id("Qwen/Qwen2.5-VL-7B-Instruct") == ("Qwen/Qwen2.5-VL-7B-Instruct", None)
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for local_or_not_an_id in ("/abs/path", "./rel/model", "~/models/x", "a/b/c", "name", "", None, "org/name@"):
        assert parse_repo_id(local_or_not_an_id) is None, local_or_not_an_id
    (tmp_path / "outputs" / "model").mkdir(parents=True)
    assert parse_repo_id("outputs/model") is None  # an existing folder wins over the Hub
    assert parse_dataset_id("hiyouga/geometry3k@train") == ("hiyouga/geometry3k", None, "train")
    assert parse_dataset_id("org/name:main@test[:100]") == ("org/name", "main", "test[:100]")
    assert parse_dataset_id("org/name") == ("org/name", None, None)
    for not_a_dataset_id in ("data/train.jsonl", "data/train.parquet@train", "/abs/rows@train", "outputs/model"):
        assert parse_dataset_id(not_a_dataset_id) is None, not_a_dataset_id


def fake_hub_cache(home, repo_id="org/tiny"):
    """HF_HOME laid out as huggingface_hub's cache: hub/models--org--tiny/{refs/main, snapshots/<commit>/...}."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(str(snapshot))
    return str(snapshot)


def run_offline(home, code):
    """`code` in a fresh interpreter (huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported)."""
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_model_hub_ids_resolve_to_the_cached_snapshot_on_the_driver(tmp_path):
    snapshot = fake_hub_cache(tmp_path / "hf_home")
    local = tmp_path / "local_model"
    local.mkdir()
    out = run_offline(tmp_path / "hf_home", f"""
import json, os
from mtrl.training.training_config import load_config
from mtrl.training.paths import absolutize_paths
from mtrl.models.loader import load_config as load_model_config
from mtrl.utils.errors import UserError
os.chdir({str(tmp_path)!r})
config = load_config(["worker.actor.model.model_path=org/tiny", "worker.critic.model.model_path=local_model",
                      "worker.critic.model.tokenizer_path=org/tiny@{COMMIT}", "worker.reward.reward_type=model",
                      "worker.reward.reward_model_path=org/tiny@main",
                      "dataset.train_files=hiyouga/geometry3k@train,rows.jsonl", "dataset.val_files=org/x:cfg@test"])
absolutize_paths(config)
w = config.worker
result = dict(actor=w.actor.model.model_path, actor_tok=w.actor.model.tokenizer_path, critic=w.critic.model.model_path,
              critic_tok=w.critic.model.tokenizer_path, reward=w.reward.reward_model_path,
              train=config.dataset.train_files, val=config.dataset.val_files,
              hidden=load_model_config(w.actor.model.model_path).hidden_size)
config.worker.actor.model.model_path = "org/not-cached"
try:
    absolutize_paths(config)
except UserError as e:
    result["error"] = str(e)
print(json.dumps(result))
""")
    assert out["actor"] == out["critic_tok"] == out["reward"] == snapshot and out["hidden"] == 16
    assert out["critic"] == str(local)  # local folders: made absolute, nothing else
    assert out["actor_tok"] is None  # unset stays unset (the loader falls back to model_path)
    assert out["train"] == f"hiyouga/geometry3k@train,{tmp_path / 'rows.jsonl'}" and out["val"] == "org/x:cfg@test"
    assert ("worker.actor.model.model_path = 'org/not-cached'" in out["error"]
            and "not in the Hugging Face cache" in out["error"] and "HF_HUB_OFFLINE=1" in out["error"]
            and "hf download org/not-cached" in out["error"])


def test_hub_model_is_fetched_once_for_all_keys(tmp_path, monkeypatch):
    """Online: one snapshot_download per repository, whatever the number of keys naming it."""
    import huggingface_hub

    from mtrl.training.paths import absolutize_paths
    from mtrl.training.training_config import load_config

    calls = []

    def fake_download(repo_id, revision=None, repo_type=None, **kwargs):
        calls.append((repo_id, revision, repo_type))
        return f"/snapshots/{repo_id}/{revision}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    config = load_config(["worker.actor.model.model_path=Qwen/Qwen2.5-VL-7B-Instruct",
                          "worker.actor.model.tokenizer_path=Qwen/Qwen2.5-VL-7B-Instruct",
                          "worker.critic.model.model_path=Qwen/Qwen2.5-VL-7B-Instruct@v2",
                          "dataset.train_files=rows.jsonl"])
    absolutize_paths(config)
    assert config.worker.actor.model.model_path == config.worker.actor.model.tokenizer_path == \
        "/snapshots/Qwen/Qwen2.5-VL-7B-Instruct/None"
    assert config.worker.critic.model.model_path == "/snapshots/Qwen/Qwen2.5-VL-7B-Instruct/v2"
    assert calls == [("Qwen/Qwen2.5-VL-7B-Instruct", None, "model"), ("Qwen/Qwen2.5-VL-7B-Instruct", "v2", "model")]


@pytest.mark.parametrize("error, message", [("RepositoryNotFoundError", "does not exist (or is private"),
                                            ("GatedRepoError", "is gated"),
                                            ("RevisionNotFoundError", "has no revision")])
def test_hub_errors_say_what_to_do(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    from mtrl.utils.errors import UserError
    from mtrl.utils.hub import download_snapshot

    def fail(*args, **kwargs):
        cls = getattr(errors, error)
        exc = cls.__new__(cls)  # its __init__ wants a real HTTP response
        Exception.__init__(exc, "boom")
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(UserError, match=re.escape(message)):
        download_snapshot("org/name@dev", "worker.actor.model.model_path")


# As an EasyR1 user writes it: the batch form, `overall` plus other scores.
EASYR1_REWARD = '''
def compute_score(reward_inputs, weight=1.0):
    scores = []
    for reward_input in reward_inputs:
        correct = float(reward_input["ground_truth"].lower() in reward_input["response"].lower())
        scores.append({"overall": weight * correct, "accuracy": correct,
                       "length": float(reward_input["response_length"])})
    return scores
'''


@pytest.mark.slow
def test_a_run_from_hub_model_saved_dataset_and_easyr1_reward(tmp_path):
    """The quickstart RL run with what a user from EasyR1 brings: the model as a Hub id (from a fake offline
    cache), the data as a `save_to_disk` DatasetDict with image bytes, the reward as EasyR1's compute_score."""
    import shutil

    import pyarrow as pa

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from shapes_assets import shapes_task, tiny_vl_model
    from test_dataset import save_to_disk_layout

    task = shapes_task(n_train=16, n_val=8)
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--org--tiny-vl"
    shutil.copytree(tiny_vl_model(), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)

    def split_table(name):
        with open(os.path.join(task, f"{name}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        images = [[{"bytes": open(os.path.join(task, p), "rb").read(), "path": p} for p in r["images"]] for r in rows]
        return pa.table({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows],
                         "images": images})

    saved = save_to_disk_layout(tmp_path / "shapes_saved", None, {"train": split_table("train"),
                                                                  "val": split_table("val")})
    (tmp_path / "easyr1_reward.py").write_text(EASYR1_REWARD)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(home), "PYTHONPATH": REPO}
    env.pop("HF_HUB_CACHE", None)
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={REPO}/configs/quickstart.yaml", "stages=[]",
            "training.max_steps=1", "training.val_freq=1", "training.save_checkpoint_path=runs/hub",
            "worker.actor.model.model_path=org/tiny-vl", "worker.actor.model.build_tiny_if_missing=null",
            f"dataset.train_files={saved}@train", f"dataset.val_files={saved}@val", "dataset.image_dir=null",
            "dataset.generate_if_missing=null", "dataset.rollout_batch_size=8", "dataset.val_batch_size=8",
            f"worker.reward.reward_fn_path={tmp_path / 'easyr1_reward.py'}:compute_score",
            "worker.reward.reward_type=batch", "worker.reward.reward_fn_kwargs={weight: 2.0}"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [json.loads(line) for line in (tmp_path / "runs" / "hub" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in train] == [1]
    assert train[0]["reward/overall"] == pytest.approx(2.0 * train[0]["reward/accuracy"])
    assert train[0]["reward/length"] > 0
    saved_config = (tmp_path / "runs" / "hub" / "config.yaml").read_text()
    assert str(repo / "snapshots" / COMMIT) in saved_config  # what every worker was given
