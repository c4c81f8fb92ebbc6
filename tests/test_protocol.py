"""DataBatch: select/pop/union, chunk+concat, repeat, reorder and Ray-style serialization round trips."""

import pickle

import numpy as np
import pytest
import torch

from mtrl.protocol import DataBatch


def make_batch(n=5):
    return DataBatch(
        tensors={"ids": torch.arange(n * 3).view(n, 3), "score": torch.arange(n, dtype=torch.float32) / 2,
                 "half": torch.arange(n, dtype=torch.bfloat16)},
        non_tensors={"uid": [f"u{i}" for i in range(n)], "images": [[f"img{i}"] * (i % 3) for i in range(n)]},
        meta={"step": 7},
    )


def assert_same(a, b):
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]) and a.tensors[k].dtype == b.tensors[k].dtype
    for k in a.non_tensors:
        assert list(a.non_tensors[k]) == list(b.non_tensors[k])


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="batch size"):
        DataBatch(tensors={"a": torch.zeros(3)}, non_tensors={"b": [1, 2]})


def test_list_valued_non_tensors_stay_per_row():
    b = make_batch(3)
    assert b["images"][2] == ["img2", "img2"] and len(b) == 3


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_chunk_concat_round_trip_with_uneven_sizes(chunks):
    b = make_batch(5)
    parts = b.chunk(chunks)
    assert [len(p) for p in parts] == [len(x) for x in np.array_split(np.arange(5), chunks)]
    assert_same(DataBatch.concat(parts), b)
    assert DataBatch.concat(parts).meta == {"step": 7}


def test_split_sizes():
    assert [len(p) for p in make_batch(5).split(2)] == [2, 2, 1]


def test_repeat_interleaved_and_tiled():
    b = make_batch(2)
    r = b.repeat(3)
    assert list(r["uid"]) == ["u0", "u0", "u0", "u1", "u1", "u1"]
    assert r["ids"][:, 0].tolist() == [0, 0, 0, 3, 3, 3]
    t = b.repeat(2, interleave=False)
    assert list(t["uid"]) == ["u0", "u1", "u0", "u1"]


def test_reorder_and_inverse():
    b = make_batch(5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    r = make_batch(5)
    r.reorder(perm)
    assert list(r["uid"]) == ["u3", "u0", "u4", "u1", "u2"]
    r.reorder(torch.argsort(perm))
    assert_same(r, b)


def test_select_pop_union():
    b = make_batch(4)
    sel = b.select(["ids", "uid"])
    assert sel.keys() == ["ids", "uid"] and sel.meta == {"step": 7}
    popped = b.pop(["score"])
    assert "score" not in b and torch.equal(popped["score"], make_batch(4)["score"])
    b.union(popped)
    assert_same(b.select(make_batch(4).keys()), make_batch(4))
    with pytest.raises(ValueError, match="different values"):
        b.union(DataBatch(tensors={"score": torch.ones(4)}))
    with pytest.raises(KeyError, match="no field"):
        b.select(["nope"])


def test_boolean_index():
    b = make_batch(4)
    kept = b.index(np.array([True, False, True, False]))
    assert list(kept["uid"]) == ["u0", "u2"]


def test_pickle_round_trip_keeps_dtypes():
    b = make_batch(4)
    restored = pickle.loads(pickle.dumps(b))
    assert_same(restored, b)
    assert restored.meta == b.meta
    restored.tensors["score"] += 1  # restored tensors are writable, not views of a read-only buffer
