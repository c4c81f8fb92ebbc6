"""Dynamic batching by token budget, data-parallel balancing, and order restoration."""

import random

import pytest
import torch

from mtrl.utils.seqlen_balancing import (
    balance_across_ranks,
    flatten_partitions,
    greedy_partition,
    karmarkar_karp,
    micro_batches_by_token_budget,
    num_micro_batches_by_token_budget,
    partition_stats,
    restore_order,
)


def assert_exact_cover(parts, n):
    flat = flatten_partitions(parts)
    assert sorted(flat) == list(range(n)), "every index exactly once"
    assert all(p == sorted(p) for p in parts)


# ----------------------------------------------------------------------------------------------
# Token budget
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_token_budget_respected_and_exact_cover(seed):
    rng = random.Random(seed)
    lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
    budget = rng.choice([300, 512, 1000, 4096])
    parts = micro_batches_by_token_budget(lens, budget)
    assert_exact_cover(parts, len(lens))
    assert all(p for p in parts)
    assert all(sum(lens[i] for i in p) <= budget for p in parts)
    # Never more than twice the lower bound on this kind of data (and at least the bound).
    lower = -(-sum(lens) // budget)
    assert lower <= len(parts) <= max(2 * lower, 1)
    assert num_micro_batches_by_token_budget(lens, budget) == len(parts)


def test_over_long_sequences_get_their_own_micro_batch():
    lens = [50, 700, 30, 20, 900, 60]
    parts = micro_batches_by_token_budget(lens, 100)
    assert_exact_cover(parts, len(lens))
    assert [1] in parts and [4] in parts
    for p in parts:
        assert len(p) == 1 or sum(lens[i] for i in p) <= 100


def test_token_budget_hand_case_is_few_and_even():
    # 8 sequences, total 800, budget 400 -> the lower bound of 2 micro-batches is reachable.
    lens = [300, 100, 250, 50, 20, 30, 40, 10]
    parts = micro_batches_by_token_budget(lens, 400)
    assert len(parts) == 2
    assert sorted(sum(lens[i] for i in p) for p in parts) == [400, 400]


def test_min_num_micro_batches_for_equal_counts_across_ranks():
    lens = [10, 10, 10, 10, 10, 10]
    assert len(micro_batches_by_token_budget(lens, 1000)) == 1
    parts = micro_batches_by_token_budget(lens, 1000, min_num_micro_batches=4)
    assert len(parts) == 4 and all(parts)
    assert_exact_cover(parts, 6)
    # With over-long samples already providing micro-batches, the minimum counts them.
    parts = micro_batches_by_token_budget([500, 10, 10, 10], 100, min_num_micro_batches=3)
    assert len(parts) == 3 and [0] in parts
    with pytest.raises(ValueError):
        micro_batches_by_token_budget([1, 2], 10, min_num_micro_batches=3)


def test_token_budget_edge_cases():
    assert micro_batches_by_token_budget([], 10) == []
    assert micro_batches_by_token_budget([5], 10) == [[0]]
    assert micro_batches_by_token_budget([50], 10) == [[0]]
    with pytest.raises(ValueError):
        micro_batches_by_token_budget([1], 0)


# ----------------------------------------------------------------------------------------------
# Data-parallel balancing
# ----------------------------------------------------------------------------------------------
def test_balance_hand_case_is_perfect():
    # 3 ranks, 2 samples each: {9, 1}, {8, 2}, {7, 3} sum to 10 each.
    lens = [9, 8, 7, 3, 2, 1]
    parts = balance_across_ranks(lens, 3, equal_size=True)
    assert_exact_cover(parts, 6)
    assert all(len(p) == 2 for p in parts)
    assert partition_stats(lens, parts) == {"min": 10.0, "max": 10.0, "mean": 10.0, "spread": 0.0}


def test_balance_beats_contiguous_split_and_greedy():
    rng = random.Random(0)
    lens = sorted(rng.randint(10, 2000) for _ in range(64))  # sorted: contiguous chunks are very uneven
    k = 8
    kk = balance_across_ranks(lens, k, equal_size=True)
    assert_exact_cover(kk, 64)
    assert all(len(p) == 8 for p in kk)
    contiguous = [list(range(r * 8, r * 8 + 8)) for r in range(k)]
    kk_spread = partition_stats(lens, kk)["spread"]
    assert kk_spread < 0.05 * partition_stats(lens, contiguous)["spread"]
    assert kk_spread <= partition_stats(lens, greedy_partition(lens, k, equal_size=True))["spread"]
    assert kk_spread <= 0.02 * sum(lens) / k


def test_balance_unequal_sizes_and_errors():
    lens = [100, 1, 1, 1, 1, 96]
    parts = balance_across_ranks(lens, 2, equal_size=False)
    assert_exact_cover(parts, 6)
    assert partition_stats(lens, parts)["spread"] == 0.0
    with pytest.raises(ValueError, match="multiple"):
        balance_across_ranks([1, 2, 3], 2, equal_size=True)
    with pytest.raises(ValueError):
        karmarkar_karp([1, 2], 0)


def test_karmarkar_karp_deterministic_and_handles_more_groups_than_items():
    lens = [5, 3, 5, 3, 1]
    assert karmarkar_karp(lens, 2) == karmarkar_karp(list(lens), 2)
    parts = karmarkar_karp([4, 2], 4)
    assert len(parts) == 4 and sorted(map(len, parts)) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------
# Order restoration
# ----------------------------------------------------------------------------------------------
def test_restore_order_round_trip_tensor_and_list():
    rng = random.Random(3)
    lens = [rng.randint(1, 100) for _ in range(23)]
    parts = micro_batches_by_token_budget(lens, 150)
    order = flatten_partitions(parts)
    data = torch.arange(23 * 4).reshape(23, 4)
    # Outputs come back micro-batch by micro-batch, concatenated.
    outputs = torch.cat([data[p] for p in parts])
    assert torch.equal(restore_order(outputs, parts), data)
    assert torch.equal(restore_order(outputs, order), data)
    assert restore_order([f"s{i}" for i in order], parts) == [f"s{i}" for i in range(23)]
    with pytest.raises(ValueError):
        restore_order(outputs, [[0, 1], [1]])
