"""Position ids of one sequence, computed from the model config alone (no model instance).

`compute_position_ids(model_config, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts)`
returns exactly what the model in transformers 5.x computes for that sequence itself
(`get_rope_index` of Qwen2-VL / Qwen2.5-VL / Qwen3-VL), so the dataset can precompute prompt
positions and the workers can compute prompt + response positions without holding the model.

Shapes:

* Qwen2-VL, Qwen2.5-VL, Qwen3-VL (multimodal RoPE): (3, L) -- rows (temporal, height, width). Text
  tokens get the same value in all three rows and advance by one per token. The tokens of one image
  (or one video, or for Qwen3-VL one video frame) form a grid starting at the current position p:
  temporal = p + floor(t * interval), height = p + row, width = p + column (in merged patches); after
  it the position advances by max(grid_h, grid_w) / spatial_merge_size (the temporal extent is not
  added: that is the transformers 5 rule). interval = 1, except Qwen2.5-VL videos:
  tokens_per_second * second_per_grid_ts[k] (default second_per_grid_ts 1.0, as transformers).
  Qwen3-VL puts a timestamp between video frames, so each frame is its own (1, h, w) grid.
* text-only models: (L,) = 0 .. L-1.

In a batch the rows are stacked as (B, 3, L) (docs/DATA_LAYOUT.md); the model's forward takes
(3, B, L) -- transpose dims 0 and 1. Padding positions hold 0, as in transformers. The model also
accepts (4, B, L) with a text-position row first (used by transformers when packing without a mask);
it is not produced here.

Vision tokens are recognised by the config's `image_token_id` / `video_token_id` (the expanded
`<|image_pad|>` / `<|video_pad|>` tokens), exactly like the model's `mm_token_type_ids`; each maximal
run of them consumes the next grid. A run whose length disagrees with its grid, or a run without a
grid left, is a ValueError (for example a generated response that contains a vision pad token).
"""

from __future__ import annotations

import itertools
from typing import Any, List, Optional, Sequence

import torch

__all__ = ["compute_position_ids", "uses_mrope", "MROPE_MODEL_TYPES"]

#: model_type -> how video grids are laid out ("whole": one grid per video; "per_frame": Qwen3-VL).
MROPE_MODEL_TYPES = {
    "qwen2_vl": "whole",
    "qwen2_5_vl": "whole",
    "qwen3_vl": "per_frame",
    "qwen3_vl_moe": "per_frame",
}


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def uses_mrope(model_config: Any) -> bool:
    """True for the Qwen-VL family (3-row multimodal positions), False for text-only models."""
    if model_config is None:
        return False
    model_type = _get(model_config, "model_type")
    if model_type in MROPE_MODEL_TYPES:
        return True
    if _get(model_config, "vision_config") is not None:
        raise NotImplementedError(f"position ids for vision model type {model_type!r} are not implemented; "
                                  f"supported: {sorted(MROPE_MODEL_TYPES)}")
    return False


def _as_grids(grid_thw: Any) -> List[List[int]]:
    if grid_thw is None:
        return []
    return torch.as_tensor(grid_thw).reshape(-1, 3).tolist()


def _vision_positions(start: int, grid: Sequence[int], merge: int, interval: Any) -> torch.Tensor:
    """(3, t*h*w/merge^2) positions of one grid, as the model's `get_vision_position_ids`."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = (torch.arange(t) * interval).long()  # float interval: same dtype path as transformers
    height = torch.arange(h) + start
    width = torch.arange(w) + start
    tt, hh, ww = torch.meshgrid(temporal, height, width, indexing="ij")
    pos = torch.stack([tt, hh, ww], dim=0).reshape(3, -1)
    pos[0] += start
    return pos


def compute_position_ids(model_config: Any, input_ids: torch.Tensor, image_grid_thw: Optional[Any] = None,
                         video_grid_thw: Optional[Any] = None,
                         second_per_grid_ts: Optional[Any] = None) -> torch.Tensor:
    """Position ids of ONE unpadded sequence `input_ids` (1-D): (3, L) for Qwen-VL models, (L,) otherwise.

    `image_grid_thw` (n_images, 3), `video_grid_thw` (n_videos, 3) and `second_per_grid_ts`
    (n_videos,) are the sample's own processor outputs, in order of appearance. `model_config` is the
    model's (top-level) Hugging Face config, or a dict with the same fields (model_type,
    image_token_id, video_token_id, vision_config.spatial_merge_size, vision_config.tokens_per_second).
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 1:
        raise ValueError(f"compute_position_ids takes one 1-D sequence, got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[0]
    if not uses_mrope(model_config):
        return torch.arange(length, dtype=torch.long)

    model_type = _get(model_config, "model_type")
    vision_config = _get(model_config, "vision_config")
    merge = int(_get(vision_config, "spatial_merge_size", 2))
    image_grids = _as_grids(image_grid_thw)
    video_grids = _as_grids(video_grid_thw)
    intervals: List[Any] = [1] * len(video_grids)
    if model_type == "qwen2_5_vl":
        tokens_per_second = _get(vision_config, "tokens_per_second", 2)
        seconds = ([1] * len(video_grids) if second_per_grid_ts is None
                   else list(torch.as_tensor(second_per_grid_ts).reshape(-1)))
        intervals = [tokens_per_second * s for s in seconds]
    if MROPE_MODEL_TYPES[model_type] == "per_frame":  # each frame separated by its timestamp text
        video_grids = [[1, h, w] for t, h, w in video_grids for _ in range(t)]
        intervals = [1] * len(video_grids)

    image_id, video_id = _get(model_config, "image_token_id"), _get(model_config, "video_token_id")
    types = torch.zeros(length, dtype=torch.long)
    if image_id is not None:
        types[input_ids == image_id] = 1
    if video_id is not None:
        types[input_ids == video_id] = 2

    grids = {1: iter(image_grids), 2: iter(zip(video_grids, intervals))}
    pieces, current, offset = [], 0, 0
    for kind, run in itertools.groupby(types.tolist()):
        run_len = len(list(run))
        if kind == 0:
            pieces.append(torch.arange(run_len).view(1, -1).expand(3, -1) + current)
            current += run_len
        else:
            name = "image" if kind == 1 else "video"
            item = next(grids[kind], None)
            if item is None:
                raise ValueError(f"a run of {run_len} {name} tokens at position {offset} has no {name}_grid_thw "
                                 f"entry left (vision pad tokens outside the prompt's images?)")
            grid, interval = (item, 1) if kind == 1 else item
            expected = grid[0] * grid[1] * grid[2] // (merge * merge)
            if run_len != expected:
                raise ValueError(f"a run of {run_len} {name} tokens at position {offset} does not match its grid "
                                 f"{list(grid)} ({expected} tokens with spatial_merge_size={merge})")
            pieces.append(_vision_positions(current, grid, merge, interval))
            current += max(grid[1], grid[2]) // merge
        offset += run_len
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).to(torch.long)
