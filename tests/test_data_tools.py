"""Data tools: train/val splitting with a seed (`python -m mtrl.tools.split_data`), mixing several training
files (concat / weighted_sampling / balanced) and the shapes task's preference pairs."""

import json

import pytest

from mtrl.tools import split_data
from mtrl.training.training_config import ConfigError, load_config
from mtrl.utils.data_mixing import MixtureDataset, build_mixed_dataset, mixture_counts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i % 3)} for i in range(50)]
    src = tmp_path / "all.jsonl"
    write_jsonl(src, rows)
    assert split_data.main([str(src), "--val-ratio", "0.2", "--seed", "7"]) == 0
    train, val = read_jsonl(tmp_path / "all_train.jsonl"), read_jsonl(tmp_path / "all_val.jsonl")
    assert len(val) == 10 and len(train) == 40
    assert sorted(r["prompt"] for r in train + val) == sorted(r["prompt"] for r in rows)
    assert [r["prompt"] for r in train] == [r["prompt"] for r in rows if r in train]  # input order kept
    first = (tmp_path / "all_val.jsonl").read_text()
    split_data.main([str(src), "--val-ratio", "0.2", "--seed", "7"])
    assert (tmp_path / "all_val.jsonl").read_text() == first  # same seed, same split
    split_data.main([str(src), "--val-ratio", "0.2", "--seed", "8"])
    assert (tmp_path / "all_val.jsonl").read_text() != first


def test_split_by_size_stratified_and_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [{"prompt": f"q{i}", "kind": "a" if i < 40 else "b"} for i in range(60)]
    src = tmp_path / "all.jsonl"
    write_jsonl(src, rows)
    split_data.main([str(src), "--val-ratio", "0.25", "--stratify-key", "kind", "--val-out", str(tmp_path / "v.parquet"),
                     "--train-out", str(tmp_path / "t.parquet")])
    val = split_data.read_rows(str(tmp_path / "v.parquet"))
    assert sum(r["kind"] == "a" for r in val) == 10 and sum(r["kind"] == "b" for r in val) == 5
    train, val_idx = split_data.split_indices(10, val_size=3, seed=0)
    assert len(val_idx) == 3 and not set(train) & set(val_idx)
    with pytest.raises(SystemExit):
        split_data.main([str(src), "--val-size", "60"])


@pytest.mark.parametrize("strategy,weights,expected", [
    ("concat", None, [10, 30]),
    ("concat", [2.0, 0.5], [20, 15]),
    ("weighted_sampling", [1.0, 1.0], [20, 20]),
    ("weighted_sampling", [3.0, 1.0], [30, 10]),
    ("weighted_sampling", None, [10, 30]),
    ("balanced", None, [30, 30]),
])
def test_mixture_counts(strategy, weights, expected):
    assert mixture_counts([10, 30], strategy, weights) == expected


class Rows:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"name": self.name, "row": i}

    def collate(self, items):
        return items


def test_mixture_dataset_draws_whole_cycles_deterministically():
    mix = MixtureDataset([Rows("a", 4), Rows("b", 10)], "balanced", seed=3)
    items = [mix[i] for i in range(len(mix))]
    a_rows = [it["row"] for it in items if it["name"] == "a"]
    assert len(a_rows) == 10 and sorted(a_rows[:4]) == [0, 1, 2, 3] and sorted(a_rows[4:8]) == [0, 1, 2, 3]
    assert [it["index"] for it in items] == list(range(14 + 6))
    again = MixtureDataset([Rows("a", 4), Rows("b", 10)], "balanced", seed=3)
    assert [again[i]["row"] for i in range(len(again))] == [it["row"] for it in items]
    assert mix.summary() == {"0": 10, "1": 10}


def test_build_mixed_dataset_is_the_plain_dataset_without_mixing():
    built = []

    def build(files):
        built.append(files)
        return Rows(files, 5)

    assert isinstance(build_mixed_dataset("a.jsonl,b.jsonl", build), Rows) and built == ["a.jsonl,b.jsonl"]
    mix = build_mixed_dataset("a.jsonl, b.jsonl", build, "weighted_sampling", [1, 4], seed=0)
    assert isinstance(mix, MixtureDataset) and mix.counts == [2, 8]


def test_file_weights_are_validated(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: {train_files: 'a.jsonl,b.jsonl', rollout_batch_size: 8}\n"
                   "worker: {actor: {global_batch_size: 4}}\ntraining: {n_gpus_per_node: 1}\n")
    config = load_config([f"config={cfg}", "dataset.mix_strategy=weighted_sampling", "dataset.file_weights=[1,2]"])
    assert config.dataset.file_weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match="one weight per entry"):
        load_config([f"config={cfg}", "dataset.file_weights=[1]"])
    with pytest.raises(ConfigError, match="mix_strategy"):
        load_config([f"config={cfg}", "dataset.mix_strategy=interleave"])


def test_shapes_preference_pairs(tmp_path):
    from mtrl.utils.shapes_task import generate_task, write_preference_pairs

    task = generate_task(str(tmp_path / "shapes"), n_train=20, n_val=5, seed=0, difficulty="medium")
    pairs = \
        [json.loads(line) for line in open(write_preference_pairs(task, "train"))]
    rows = read_jsonl(tmp_path / "shapes" / "train.jsonl")
    assert len(pairs) == len(rows)
    for pair, row in zip(pairs, rows):
        assert pair["chosen"] == row["answer"] and pair["rejected"] != row["answer"] and pair["images"] == row["images"]
