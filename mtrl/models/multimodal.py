"""Model-input glue for Qwen-VL models: token types and batching of per-sample vision inputs."""

from typing import Any, Dict, List, Optional, Sequence

import torch

# Vision inputs are concatenated along dim 0 across a batch, in row order (the model splits them
# back by the grid sizes).
_CONCAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def text_config_token_ids(config: Any) -> Dict[str, Optional[int]]:
    return {"image": getattr(config, "image_token_id", None), "video": getattr(config, "video_token_id", None)}


def mm_token_type_ids(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """0 for text, 1 for image placeholder tokens, 2 for video placeholder tokens (transformers 5 convention)."""
    ids = text_config_token_ids(config)
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    if ids["image"] is not None:
        types[input_ids == ids["image"]] = 1
    if ids["video"] is not None:
        types[input_ids == ids["video"]] = 2
    return types


def batch_multimodal_inputs(per_sample: Optional[Sequence[Dict[str, torch.Tensor]]],
                            device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Concatenate per-sample vision inputs (rows without images contribute nothing)."""
    if per_sample is None:
        return {}
    out: Dict[str, List[torch.Tensor]] = {}
    for sample in per_sample:
        for key, value in (sample or {}).items():
            if key in _CONCAT_KEYS:
                out.setdefault(key, []).append(torch.as_tensor(value))
    return {k: torch.cat(v).to(device) if device is not None else torch.cat(v) for k, v in out.items()}


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None
