"""The GPU recipes in examples/: every config validates (print_config=true, no model download), every file it
names exists or is written by its prepare_data.py, and the data preparation writes rows MTRL reads."""

import importlib.util
import io
import os
import sys

import pytest
from PIL import Image

from mtrl.training.training_config import load_config
from mtrl.training.training_main import main
from mtrl.utils.hub import parse_dataset_id, parse_repo_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
RECIPES = sorted(d for d in os.listdir(EXAMPLES) if os.path.isfile(os.path.join(EXAMPLES, d, "config.yaml")))


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def named_files(config):
    """(config key, path) of every local file or folder the config reads; Hub ids are not files."""
    d, w = config.dataset, config.worker
    found = []
    for key in ("train_files", "val_files", "sft_files", "preference_files", "preference_val_files"):
        for entry in filter(None, (e.strip() for e in (getattr(d, key) or "").split(","))):
            if parse_dataset_id(entry) is None:
                found.append((f"dataset.{key}", entry.split("@")[0]))
    if d.image_dir:
        found.append(("dataset.image_dir", d.image_dir))
    if d.format_prompt and "{{" not in d.format_prompt:  # a template file, not inline text
        found.append(("dataset.format_prompt", d.format_prompt))
    for role in ("actor", "critic"):
        model = getattr(w, role).model
        for key in ("model_path", "tokenizer_path"):
            path = getattr(model, key)
            if path and parse_repo_id(path) is None and not model.build_tiny_if_missing:
                found.append((f"worker.{role}.model.{key}", path))
    if w.reward.reward_model_path and parse_repo_id(w.reward.reward_model_path) is None:
        found.append(("worker.reward.reward_model_path", w.reward.reward_model_path))
    if config.training.load_checkpoint_path:
        found.append(("training.load_checkpoint_path", config.training.load_checkpoint_path))
    return found


def test_the_gpu_recipes_are_there():
    assert {"qwen2_5_vl_7b_tprl", "qwen3_vl_8b_tprl", "qwen2_5_7b_gsm8k_grpo", "qwen2_5_vl_3b_lora_24gb",
            "validate_checkpoint"} <= set(RECIPES)
    for recipe in RECIPES:
        files = set(os.listdir(os.path.join(EXAMPLES, recipe)))
        assert {"config.yaml", "prepare_data.py", "README.md"} <= files, recipe
        readme = open(os.path.join(EXAMPLES, recipe, "README.md"), encoding="utf-8").read()
        assert f"config=examples/{recipe}/config.yaml" in readme and f"examples/{recipe}/prepare_data.py" in readme
        assert "estimate" in readme and "memory" in readme, recipe  # memory and results, marked as estimates


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_validates_and_its_files_exist_or_are_prepared(recipe, capsys, monkeypatch):
    config_file = os.path.join(EXAMPLES, recipe, "config.yaml")
    assert main([f"config={config_file}", "print_config=true"]) == 0
    assert "model_path:" in capsys.readouterr().out
    monkeypatch.chdir(REPO)  # the recipes run from the repository root
    prepared = set(load_module(os.path.join(EXAMPLES, recipe, "prepare_data.py"), f"prepare_{recipe}").OUTPUTS)
    config = load_config([f"config={config_file}"])
    files = named_files(config)
    assert any(key == "dataset.val_files" for key, _ in files), "every recipe validates on prepared data"
    for key, path in files:
        assert os.path.exists(path) or os.path.normpath(path) in prepared, f"{recipe}: {key} = {path}"
    assert {os.path.normpath(p) for _, p in files if p.startswith("data/")} == prepared, \
        f"{recipe}: prepare_data.py writes exactly the data the config reads"
    reward = config.worker.reward.reward_fn_path.split(":")[0]
    assert os.path.isfile(os.path.join(config.config_dir, reward)), f"{recipe}: reward file {reward}"


# ----------------------------------------------------------------------------- data preparation, offline


def png(colour, size=(37, 23)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def fake_hub(monkeypatch, tables):
    """`datasets.load_dataset` answering from in-memory tables (no network here)."""
    import datasets

    def load_dataset(repo, config=None, **kwargs):
        return datasets.DatasetDict(tables[(repo, config)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_prepare_writes_rows_mtrl_reads(tmp_path, monkeypatch):
    import datasets

    from mtrl.models.tiny import build_tiny_model
    from mtrl.utils.dataset import RLDataset

    sys.path.insert(0, EXAMPLES)
    try:
        hub_rows = load_module(os.path.join(EXAMPLES, "hub_rows.py"), "hub_rows_under_test")
    finally:
        sys.path.remove(EXAMPLES)
    colours = [(200, 0, 0), (0, 150, 0)]
    geometry = datasets.Dataset.from_dict(
        {"problem": ["<image>Find x.", "<image>Find the angle."], "answer": ["3", "45"],
         "images": [[Image.open(io.BytesIO(png(c)))] for c in colours], "id": [1, 2]})
    gsm8k = datasets.Dataset.from_dict({"question": ["2 + 2?", "Large?"], "answer": ["2 + 2 = 4\n#### 4",
                                                                                     "so\n#### 1,234"]})
    fake_hub(monkeypatch, {("hiyouga/geometry3k", None): {"train": geometry, "test": geometry},
                           ("openai/gsm8k", "main"): {"train": gsm8k, "test": gsm8k}})
    monkeypatch.setattr(hub_rows, "REPO_ROOT", str(tmp_path))
    written = hub_rows.prepare(["geometry3k_train", "gsm8k_test"], argv=[])
    assert written == [str(tmp_path / "data/geometry3k/train.parquet"), str(tmp_path / "data/gsm8k/test.parquet")]
    assert hub_rows.prepare(["gsm8k_test"], argv=[]) == []  # kept unless --force
    assert hub_rows.prepare(["gsm8k_test"], argv=["--force", "--limit", "1"]) == written[1:]

    from transformers import AutoConfig, AutoProcessor

    folder = str(build_tiny_model("qwen2_vl", tmp_path / "vl"))
    processor = AutoProcessor.from_pretrained(folder)
    ds = RLDataset(written[0], processor.tokenizer, processor, AutoConfig.from_pretrained(folder),
                   min_pixels=28 * 28, max_pixels=56 * 56)
    assert [ds[i]["ground_truth"] for i in range(2)] == ["3", "45"]
    assert [ds[i]["images"][0].getpixel((5, 5)) for i in range(2)] == colours  # the Hub's image bytes, intact
    assert [ds[i]["raw_prompt"] for i in range(2)] == ["<image>Find x.", "<image>Find the angle."]

    text = RLDataset(written[1], processor.tokenizer)  # text rows: no processor
    assert len(text) == 1 and text[0]["ground_truth"] == "4" and text[0]["raw_prompt"] == "2 + 2?"
    assert hub_rows.gsm8k_final_answer("so\n#### 1,234") == "1234"
    assert all(spec.output.startswith("data/") for spec in hub_rows.DATASETS.values())
