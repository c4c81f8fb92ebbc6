"""The built-in coloured-shapes task (mtrl.utils.shapes_task) and its reward (reward_fns/shapes.py)."""

import hashlib
import importlib.util
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from mtrl.utils import shapes_task
from mtrl.utils.shapes_task import (COLOURS, DIFFICULTIES, answer_vocabulary, ensure_task, generate_task,
                                    render_example, task_corpus)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(folder):
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _rows(folder, split):
    with open(os.path.join(folder, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- generator


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate_task(str(tmp_path / "a"), n_train=40, n_val=8, seed=3, difficulty="medium")
    b = generate_task(str(tmp_path / "b"), n_train=40, n_val=8, seed=3, difficulty="medium")
    c = generate_task(str(tmp_path / "c"), n_train=40, n_val=8, seed=4, difficulty="medium")
    assert _digest(a) == _digest(b)
    assert len(_digest(a)) == 40 + 8 + 3  # images + train.jsonl, val.jsonl, task.json
    assert _rows(a, "train") != _rows(c, "train")
    # row i does not depend on how many rows are generated
    d = generate_task(str(tmp_path / "d"), n_train=10, n_val=0, seed=3, difficulty="medium")
    assert _rows(d, "train") == _rows(a, "train")[:10]


def test_timing_2000_train_200_val(tmp_path):
    start = time.perf_counter()
    out = generate_task(str(tmp_path / "full"), n_train=2000, n_val=200, seed=0, difficulty="easy")
    elapsed = time.perf_counter() - start
    print(f"\nshapes task: 2000 train + 200 val rows (easy, 56 px) in {elapsed:.2f}s")  # reported, not asserted
    assert len(_rows(out, "train")) == 2000 and len(_rows(out, "val")) == 200


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_rows_follow_the_data_format(tmp_path, difficulty):
    d = DIFFICULTIES[difficulty]
    out = generate_task(str(tmp_path / difficulty), n_train=60, n_val=10, seed=0, difficulty=difficulty)
    vocabulary = set(answer_vocabulary(difficulty))
    corpus = set(task_corpus(difficulty))
    types = set()
    for row in _rows(out, "train") + _rows(out, "val"):
        assert set(row) == {"prompt", "answer", "images", "question_type"}
        assert row["prompt"].startswith("<image>") and row["prompt"].count("<image>") == 1
        assert row["prompt"][len("<image>"):] in corpus  # the tokenizer corpus covers every question
        assert row["answer"] in vocabulary and row["answer"] in corpus
        assert len(row["images"]) == 1 and not os.path.isabs(row["images"][0])
        with Image.open(os.path.join(out, row["images"][0])) as image:
            assert image.size == (d.image_size, d.image_size) and image.mode == "RGB"
        types.add(row["question_type"])
    assert types == set(d.question_types)
    info = json.load(open(os.path.join(out, "task.json")))
    assert info["difficulty"]["name"] == difficulty and info["n_train"] == 60


def test_easy_answers_are_in_the_picture():
    """The single shape's colour (the most common non-background pixel) is the answer: the image is needed."""
    answers = set()
    for i in range(30):
        image, row = render_example(seed=0, split="train", index=i, difficulty="easy")
        pixels = np.asarray(image).reshape(-1, 3)
        shape_pixels = pixels[(pixels != 255).any(axis=1)]
        colours, counts = np.unique(shape_pixels, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == COLOURS[row["answer"]]
        answers.add(row["answer"])
    assert answers == {"red", "green", "blue"}


def test_image_size_override_and_bad_arguments(tmp_path):
    out = generate_task(str(tmp_path / "big"), n_train=2, n_val=1, difficulty="easy", image_size=100)
    with Image.open(os.path.join(out, "images", "train_00000.png")) as image:
        assert image.size == (100, 100)
    with pytest.raises(ValueError, match="unknown difficulty"):
        generate_task(str(tmp_path / "x"), 1, 1, difficulty="impossible")


def test_ensure_task_builds_once_atomically(tmp_path):
    folder = tmp_path / "run" / "shapes"
    ensure_task(str(folder), n_train=5, n_val=2, seed=1)
    stamp = os.path.getmtime(folder / "train.jsonl")
    ensure_task(str(folder), n_train=50, n_val=20, seed=2)  # already there: kept as is
    assert os.path.getmtime(folder / "train.jsonl") == stamp and len(_rows(str(folder), "train")) == 5
    assert [n for n in os.listdir(tmp_path / "run") if n.startswith(".")] == []  # no temporary folders left

    # into a folder that already holds other files (a run directory): the task's entries are added
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    ensure_task(str(busy), n_train=3, n_val=1)
    assert (busy / "notes.txt").read_text() == "keep me" and len(_rows(str(busy), "train")) == 3


def test_ensure_task_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_task, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_task(str(tmp_path / "shapes"), n_train=3, n_val=1)
    assert os.listdir(tmp_path) == []


def test_corpus_and_cli(tmp_path, capsys):
    everything = task_corpus()
    assert set(task_corpus("easy")) <= set(everything)
    assert "What colour is the circle? Answer with one word." in everything
    assert {"red", "green", "blue", "circle", "0", "3"} <= set(everything)
    assert shapes_task.main(["--out", str(tmp_path / "cli"), "--train", "4", "--val", "2", "--seed", "5",
                             "--difficulty", "hard", "--image-size", "64"]) == 0
    assert "wrote 4 train + 2 val rows (hard)" in capsys.readouterr().out
    assert len(_rows(str(tmp_path / "cli"), "val")) == 2


# ----------------------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def reward():
    spec = importlib.util.spec_from_file_location("shapes_reward", os.path.join(REPO, "reward_fns", "shapes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("response, truth, accuracy, fmt", [
    ("red", "red", 1.0, 1.0),
    ("Red.", "red", 1.0, 1.0),
    ("  RED  ", "red", 1.0, 1.0),
    ("red, because the circle is red", "red", 1.0, 0.0),  # first word right, not concise
    ("blue", "red", 0.0, 1.0),
    ("<answer>green</answer>", "green", 1.0, 1.0),
    ("<think>it looks green</think><answer>blue</answer>", "green", 0.0, 0.0),
    ("The answer is: triangle.", "triangle", 1.0, 0.0),
    ("two", "2", 1.0, 1.0),
    ("2", "2", 1.0, 1.0),
    ("", "red", 0.0, 0.0),
    ("I think red", "red", 0.0, 0.0),
    ("red", "", 0.0, 1.0),  # no ground truth: never accurate
])
def test_reward_hand_cases(reward, response, truth, accuracy, fmt):
    score, metrics = reward.reward_function({"prompt": "<image>What colour?", "response": response,
                                             "ground_truth": truth, "images": []})
    assert metrics == {"accuracy": accuracy, "format": fmt}
    assert score == pytest.approx(0.9 * accuracy + 0.1 * fmt)
    assert 0.0 <= score <= 1.0


def test_reward_kwargs_and_batch_form(reward):
    data = {"prompt": "", "response": "red", "ground_truth": "red", "images": []}
    assert reward.reward_function(data, format_weight=0.0)[0] == 1.0
    assert reward.reward_function(dict(data, response="red is it"), format_weight=0.5)[0] == 0.5
    with pytest.raises(ValueError):
        reward.reward_function(data, format_weight=2.0)
    assert reward.batch_reward_function([data, dict(data, response="blue")]) == [
        (1.0, {"accuracy": 1.0, "format": 1.0}), (pytest.approx(0.1), {"accuracy": 0.0, "format": 1.0})]
    assert reward.extract_answer("The answer is big red", n_words=2) == "big red"
