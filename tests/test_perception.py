"""The perception-pass perturbation equals blackening image cells before the image processor."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

from mtrl.utils.seeding import sample_seed
from mtrl.workers.actor.perception import perturb_images


def _blacken_cells(image: np.ndarray, dropped_rows, patch: int) -> np.ndarray:
    out = image.copy()
    for r, c in dropped_rows:
        out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0
    return out


@pytest.mark.parametrize("patches_per_cell", [1, 2])
def test_pixel_rows_match_blackened_image(patches_per_cell):
    proc = Qwen2VLImageProcessor(min_pixels=56 * 84, max_pixels=56 * 84)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)  # already a multiple of 28: no resize
    inputs = proc(images=[Image.fromarray(image)], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6]]
    perturbed = perturb_images({"pixel_values": inputs["pixel_values"], "image_grid_thw": grid}, seed=123,
                               merge_size=proc.merge_size, patches_per_cell=patches_per_cell, mask_prob=0.5,
                               image_mean=proc.image_mean, image_std=proc.image_std)["pixel_values"]
    # Recover which cells were dropped from the perturbed rows, then check against the processor.
    cell = 14 * patches_per_cell
    n_rows, n_cols = -(-56 // cell), -(-84 // cell)
    reference_rows = {}
    for r in range(n_rows):
        for c in range(n_cols):
            reference_rows[(r, c)] = proc(images=[Image.fromarray(_blacken_cells(image, [(r, c)], cell))],
                                          return_tensors="pt")["pixel_values"]
    changed = (perturbed != inputs["pixel_values"]).any(dim=1)
    dropped = [rc for rc, ref in reference_rows.items()
               if torch.equal(((ref != inputs["pixel_values"]).any(dim=1)) & changed,
                              (ref != inputs["pixel_values"]).any(dim=1))]
    assert 0 < len(dropped) < n_rows * n_cols
    expected = proc(images=[Image.fromarray(_blacken_cells(image, dropped, cell))], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(perturbed, expected, atol=1e-5, rtol=0)


def test_perturbation_is_reproducible_and_sample_specific():
    pv = torch.randn(16, 1176)
    grid = torch.tensor([[1, 4, 4]])
    kw = dict(merge_size=2, patches_per_cell=1, mask_prob=0.5, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    a = perturb_images({"pixel_values": pv, "image_grid_thw": grid}, seed=sample_seed(1, 3, "u/0"), **kw)
    b = perturb_images({"pixel_values": pv, "image_grid_thw": grid}, seed=sample_seed(1, 3, "u/0"), **kw)
    c = perturb_images({"pixel_values": pv, "image_grid_thw": grid}, seed=sample_seed(1, 3, "u/1"), **kw)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    assert perturb_images({}, seed=0, **kw) == {}


def test_video_frames_are_perturbed_too():
    """`pixel_values_videos` rows (per `video_grid_thw`) are blackened like image rows, each temporal patch
    with its own cells; a sample with an image and a video gets both perturbed."""
    video, image = torch.randn(2 * 16, 1176), torch.randn(16, 1176)
    inputs = {"pixel_values_videos": video, "video_grid_thw": torch.tensor([[2, 4, 4]]),
              "pixel_values": image, "image_grid_thw": torch.tensor([[1, 4, 4]])}
    out = perturb_images(inputs, seed=5, merge_size=2, patches_per_cell=1, mask_prob=0.5, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3, video_mean=[0.25] * 3, video_std=[0.5] * 3)
    changed = (out["pixel_values_videos"] != video).any(dim=1)
    assert 0 < int(changed.sum()) < len(video)
    assert torch.all(out["pixel_values_videos"][changed] == -0.5)  # (0 - 0.25) / 0.5: the video's own black
    assert not torch.equal(changed[:16], changed[16:])  # the two temporal patches drop different cells
    assert torch.equal(out["video_grid_thw"], inputs["video_grid_thw"])
    image_changed = (out["pixel_values"] != image).any(dim=1)
    assert image_changed.any() and torch.all(out["pixel_values"][image_changed] == -1.0)
