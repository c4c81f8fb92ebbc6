"""The TPRL perception pass input: images and video frames with random patch_size x patch_size cells
blackened (SPEC 5.1).

Qwen-VL processors turn an image into rows of `pixel_values`, one row per (patch x patch) cell
(times `temporal_patch_size` copies of the frame), in the order (t, h/m, w/m, m, m) with m the
spatial merge size. Blackening a cell in the image and re-running the processor gives exactly the
same rows as overwriting the cell's rows with the normalised value of a black pixel, so the
perturbation is applied directly to `pixel_values`, with no image re-processing. Videos are laid out
the same way in `pixel_values_videos` (per `video_grid_thw`), each temporal patch getting its own cells.
"""

import functools
from typing import Dict, Optional, Sequence, Tuple

import torch

from mtrl.utils.errors import UserError


def patches_per_cell(perception_patch_size: Optional[int], vision_patch_size: int) -> int:
    """Vision patches per side of a blackened cell; `perception_patch_size` None = one patch. The driver
    calls this at start-up (DistributedTrainer) so a mismatch fails before any worker starts."""
    if perception_patch_size is None:
        return 1
    if perception_patch_size % vision_patch_size != 0:
        raise UserError(f"`optimization.perception_patch_size` = {perception_patch_size} must be a multiple of the "
                        f"model's vision patch size {vision_patch_size} (or null for the model's own patch size).")
    return perception_patch_size // vision_patch_size


@functools.lru_cache(maxsize=16)
def black_row(row_len: int, image_mean: Tuple[float, ...], image_std: Tuple[float, ...]) -> torch.Tensor:
    """The pixel_values row of an all-black cell: per channel (0 - mean) / std, channel-major (read-only:
    cached, it is shared by every call)."""
    channels = len(image_mean)
    per_channel = torch.tensor([-m / s for m, s in zip(image_mean, image_std)], dtype=torch.float32)
    return per_channel.repeat_interleave(row_len // channels)


@functools.lru_cache(maxsize=256)
def cell_ids(grid_thw: Tuple[int, int, int], merge_size: int, patches_per_cell: int) -> Tuple[torch.Tensor, int]:
    """For each pixel_values row of one image, the id of the (frame, cell_row, cell_col) it belongs to, and the
    number of cells. Cached by grid (read-only): a batch's images mostly share a few sizes."""
    t, h, w = grid_thw
    m = merge_size
    tt, bh, bw, i, j = torch.meshgrid(torch.arange(t), torch.arange(h // m), torch.arange(w // m),
                                      torch.arange(m), torch.arange(m), indexing="ij")
    rows, cols = (bh * m + i) // patches_per_cell, (bw * m + j) // patches_per_cell
    n_rows, n_cols = -(-h // patches_per_cell), -(-w // patches_per_cell)
    return ((tt * n_rows + rows) * n_cols + cols).reshape(-1), t * n_rows * n_cols


def blacken_patches(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, *, merge_size: int,
                    patches_per_cell: int, mask_prob: float, black: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Each cell of each image independently set to black with probability `mask_prob` (one draw per cell,
    image by image, from `generator`)."""
    dropped_rows = []
    for grid in image_grid_thw.tolist():
        ids, n_cells = cell_ids(tuple(grid), merge_size, patches_per_cell)
        dropped_rows.append((torch.rand(n_cells, generator=generator) < mask_prob)[ids])
    if not dropped_rows:
        return pixel_values
    dropped = dropped_rows[0] if len(dropped_rows) == 1 else torch.cat(dropped_rows)
    return torch.where(dropped.unsqueeze(1), black.to(pixel_values.dtype), pixel_values)


def perturb_images(multi_modal_inputs: Dict[str, torch.Tensor], *, seed: int, merge_size: int,
                   patches_per_cell: int, mask_prob: float, image_mean: Sequence[float],
                   image_std: Sequence[float], video_mean: Optional[Sequence[float]] = None,
                   video_std: Optional[Sequence[float]] = None) -> Dict[str, torch.Tensor]:
    """One sample's vision inputs with its images and video frames perturbed (videos normalised by
    `video_mean` / `video_std`, by default the images' values)."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(multi_modal_inputs)
    for key, grid_key, mean, std in (("pixel_values", "image_grid_thw", image_mean, image_std),
                                     ("pixel_values_videos", "video_grid_thw", video_mean or image_mean,
                                      video_std or image_std)):
        if key in multi_modal_inputs:
            values = multi_modal_inputs[key]
            out[key] = blacken_patches(values, multi_modal_inputs[grid_key], merge_size=merge_size,
                                       patches_per_cell=patches_per_cell, mask_prob=mask_prob,
                                       black=black_row(values.shape[1], tuple(mean), tuple(std)),
                                       generator=generator)
    return out
