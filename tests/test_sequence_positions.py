"""Whole-sequence position ids after generation (`sequence_position_ids`): the per-prompt path (prompt
positions once per prompt, text responses continued by one per token) gives exactly the whole-row
numbers, by hand and on a random batch; rows it cannot take keep the whole-row checks."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2VLConfig

from mtrl.workers.actor.actor_worker import sequence_position_ids

IMAGE, VIDEO = 7, 8
VL = Qwen2VLConfig(image_token_id=IMAGE, video_token_id=VIDEO, vision_config={"spatial_merge_size": 2})


def test_hand_computed_row():
    # prompt: pad, text, 4 image tokens (grid 1 x 4 x 4 -> 2 x 2 merged), text | response: 2 tokens, pad
    ids = torch.tensor([[0, 11, IMAGE, IMAGE, IMAGE, IMAGE, 12, 21, 22, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    mm = [{"image_grid_thw": torch.tensor([[1, 4, 4]])}]
    expected = torch.tensor([[0, 0, 1, 1, 1, 1, 3, 4, 5, 0],    # temporal
                             [0, 0, 1, 1, 2, 2, 3, 4, 5, 0],    # height
                             [0, 0, 1, 2, 1, 2, 3, 4, 5, 0]])   # width
    for prompt_length in (0, 7):
        assert torch.equal(sequence_position_ids(VL, ids, mask, mm, prompt_length=prompt_length)[0], expected)


def random_batch(prompts=6, n=4, prompt_length=20, response_length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 500, (prompts, prompt_length + response_length), generator=g)
    grids = []
    for p in range(prompts):
        h, w = [(4, 4), (4, 8), (8, 4)][p % 3]  # same token count for 4x8 and 8x4, different positions
        ids[p, 3:3 + h * w // 4] = IMAGE
        grids.append(torch.tensor([[1, h, w]]))
    ids = ids.repeat_interleave(n, 0)
    ids[:, prompt_length:] = torch.randint(10, 500, (prompts * n, response_length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(prompts * n):
        mask[r, :(r // n) % 3] = 0                                    # left-padded prompts
        mask[r, prompt_length + int(torch.randint(1, response_length + 1, (1,), generator=g)):] = 0
    mask[1, prompt_length + 2] = 0  # a hole inside a response: later tokens still count on
    mm = [{"image_grid_thw": grids[r // n]} for r in range(prompts * n)]
    return ids, mask, mm, prompt_length


def test_per_prompt_path_equals_whole_rows():
    ids, mask, mm, prompt_length = random_batch()
    whole = sequence_position_ids(VL, ids, mask, mm)
    fast = sequence_position_ids(VL, ids, mask, mm, prompt_length=prompt_length)
    assert fast.shape == whole.shape == (ids.shape[0], 3, ids.shape[1])
    assert torch.equal(fast, whole)
    # 4x8 and 8x4 grids give different prompt positions although the tokens are the same
    assert not torch.equal(whole[4, :, :prompt_length], whole[8, :, :prompt_length])


def test_text_only_model():
    cfg = Qwen2Config(vocab_size=600)
    ids, mask, _, prompt_length = random_batch()
    ids = ids.masked_fill(ids == IMAGE, 13)
    fast = sequence_position_ids(cfg, ids, mask, None, prompt_length=prompt_length)
    assert fast.shape == ids.shape
    assert torch.equal(fast, sequence_position_ids(cfg, ids, mask, None))
    assert torch.equal(fast, torch.where(mask.bool(), mask.cumsum(-1) - 1, 0))


def test_vision_token_in_response_still_refused():
    ids, mask, mm, prompt_length = random_batch()
    ids[5, prompt_length] = IMAGE
    with pytest.raises(ValueError, match="image tokens"):
        sequence_position_ids(VL, ids, mask, mm, prompt_length=prompt_length)
