"""One preprocessing path for images: MTRL's dataset rows carry exactly what transformers' default Qwen-VL
processor (the one HF inference and vLLM run) makes of the original image under the same pixel bounds."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mtrl.models.tiny import build_tiny_model
from mtrl.utils.dataset import DatasetError, PROMPT_NON_TENSORS, RLDataset, build_dataloader
from mtrl.utils.vision import Video, VisionInputError, image_token_count

VL_ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
BOUNDS = dict(min_pixels=56 * 56, max_pixels=320 * 320)
#: (width, height): odd sizes, tiny (upscaled to min_pixels), huge (downscaled to max_pixels), extreme aspect ratios.
SIZES = [(37, 53), (101, 77), (5, 9), (1, 1), (1800, 1300), (31, 900), (1500, 20), (64, 64)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {arch: str(build_tiny_model(arch, tmp_path_factory.mktemp(arch) / "model")) for arch in VL_ARCHS}


def load(folder):
    from transformers import AutoConfig, AutoProcessor

    return AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder)


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def dataset(folder, rows, **kwargs):
    processor, config = load(folder)
    return RLDataset.from_rows(rows, processor.tokenizer, processor, config, max_prompt_length=8192,
                               **{**BOUNDS, **kwargs})


def reference(folder, images=None, videos=None, **kwargs):
    """A fresh default AutoProcessor on one prompt with the images / videos, bounds given as top-level
    min_pixels / max_pixels (how vLLM's mm_processor_kwargs reach it)."""
    processor, _ = load(folder)
    text = "<|vision_start|><|image_pad|><|vision_end|>" * len(images or []) + \
           "<|vision_start|><|video_pad|><|vision_end|>" * len(videos or [])
    with warnings.catch_warnings():  # transformers 5 prefers size={...}; the old form must still mean the same
        warnings.simplefilter("ignore", FutureWarning)
        return processor(text=[text], images=images, videos=videos, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_pixel_values_equal_the_default_processor_on_the_original_image(folders, arch):
    images = [noise(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    ds = dataset(folders[arch], [{"prompt": "<image>Describe.", "answer": "a", "images": [im]} for im in images])
    processor, _ = load(folders[arch])
    for k, image in enumerate(images):
        item = ds[k]
        assert item["images"] == [image] and item["images"][0].size == image.size  # what the processor was given
        assert item["mm_processor_kwargs"] == BOUNDS
        ref = reference(folders[arch], images=[image], **item["mm_processor_kwargs"])
        mm = item["multi_modal_inputs"]
        assert torch.equal(mm["image_grid_thw"], ref["image_grid_thw"]), SIZES[k]
        assert torch.equal(mm["pixel_values"], ref["pixel_values"]), SIZES[k]
        # The filter's count (from the header only) is the processor's: the row's length, its pad tokens.
        n_pad = int((item["input_ids"] == processor.image_token_id).sum())
        assert n_pad == int((ref["input_ids"] == processor.image_token_id).sum())
        assert n_pad == image_token_count(processor.image_processor, image.height, image.width, **BOUNDS)
        assert ds.prompt_lengths[k] == item["input_ids"].shape[0]
        t, h, w = mm["image_grid_thw"][0].tolist()
        assert t == 1 and BOUNDS["min_pixels"] <= h * w * processor.image_processor.patch_size ** 2 \
            <= BOUNDS["max_pixels"], SIZES[k]


def test_bounds_change_the_processor_s_resize_and_the_count(folders):
    """Same image, other bounds: the processor resizes to other grids and the filter's count follows."""
    image = noise(300, 200)
    small = dataset(folders["qwen2_vl"], [{"prompt": "<image>", "answer": "a", "images": [image]}],
                    min_pixels=28 * 28, max_pixels=84 * 84)
    large = dataset(folders["qwen2_vl"], [{"prompt": "<image>", "answer": "a", "images": [image]}],
                    min_pixels=28 * 28, max_pixels=600 * 600)
    # By hand (smart_resize): 200x300 -> 56x84 under 84*84 pixels; 196x308 (rounded to 28) under 600*600.
    assert small[0]["multi_modal_inputs"]["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert large[0]["multi_modal_inputs"]["image_grid_thw"].tolist() == [[1, 14, 22]]
    assert large.prompt_lengths[0] - small.prompt_lengths[0] == (14 * 22 - 4 * 6) // 4


def test_token_counts_agree_with_qwen_vl_utils_sizes(folders):
    """Test-only comparison: qwen-vl-utils' smart_resize picks the same sizes, so filtering counts are unchanged
    (only the resampling differed: it resized with PIL before the processor)."""
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    processor, _ = load(folders["qwen2_vl"])
    for w, h in SIZES:
        rh, rw = qwen_vl_utils.smart_resize(h, w, factor=28, **BOUNDS)
        assert image_token_count(processor.image_processor, h, w, **BOUNDS) == rh * rw // 28 ** 2


def test_absurd_aspect_ratio_is_a_row_error(folders):
    processor, _ = load(folders["qwen2_vl"])
    with pytest.raises(VisionInputError, match="cannot resize a 2010x10 image"):
        image_token_count(processor.image_processor, 10, 2010, **BOUNDS)
    with pytest.raises(DatasetError, match=r"<rows>, row 1: cannot resize a 2010x10 image"):
        dataset(folders["qwen2_vl"], [{"prompt": "<image>", "answer": "a", "images": [noise(2010, 10)]}])


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_video_frames_are_resized_by_the_video_processor(folders, arch):
    frames = [noise(90, 61, 10 + s) for s in range(5)]  # odd size; 5 frames padded to 6 by repeating the last
    ds = dataset(folders[arch], [{"prompt": "<video>What happens?", "answer": "x", "videos": [frames]}],
                 video_fps=2.0)
    item = ds[0]
    (video,) = item["videos"]
    assert isinstance(video, Video) and tuple(video.frames.shape) == (6, 3, 61, 90) and video.fps == 2.0
    expected = torch.from_numpy(np.stack([np.asarray(f) for f in frames + frames[-1:]])).permute(0, 3, 1, 2)
    assert torch.equal(video.frames, expected)  # the frames as loaded, not resized
    processor, _ = load(folders[arch])
    ref = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[video.frames], return_tensors="pt",
                    videos_kwargs={"size": {"shortest_edge": BOUNDS["min_pixels"],
                                            "longest_edge": BOUNDS["max_pixels"]},
                                   "do_sample_frames": False, "cap_pixels_per_frame": False,
                                   "video_metadata": [video.metadata()]})
    mm = item["multi_modal_inputs"]
    assert torch.equal(mm["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(mm["pixel_values_videos"], ref["pixel_values_videos"])
    assert mm["video_grid_thw"][0, 0] == 3 and ds.prompt_lengths[0] == item["input_ids"].shape[0]
    assert item["mm_processor_kwargs"] == BOUNDS


def test_collated_batch_carries_what_the_processor_got(folders):
    image, frames = noise(70, 50, 1), [noise(40, 40, s) for s in range(4)]
    rows = [{"prompt": "<image>Colour?", "answer": "red", "images": [image]},
            {"prompt": "Just text.", "answer": "yes"},
            {"prompt": "<video>?", "answer": "x", "videos": [frames]}]
    batch = next(iter(build_dataloader(dataset(folders["qwen2_5_vl"], rows), batch_size=3, shuffle=False)))
    assert set(batch.non_tensors) == set(PROMPT_NON_TENSORS)
    assert batch["images"][0] == [image] and batch["images"][1] == [] and batch["images"][2] == []
    assert list(batch["mm_processor_kwargs"]) == [BOUNDS, {}, BOUNDS]
    assert [len(v) for v in batch["videos"]] == [0, 0, 1] and batch["videos"][2][0].frames.shape == (4, 3, 40, 40)


def test_importing_the_dataset_loads_neither_qwen_vl_utils_nor_torchvision():
    code = ("import sys, mtrl.utils.dataset, mtrl.utils.vision; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('qwen_vl_utils', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": REPO}).stdout
    assert out.strip() == "[]"
    users = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(REPO, "mtrl")) for n in names
             if n.endswith(".py") and "qwen_vl_utils" in open(os.path.join(d, n), encoding="utf-8").read()]
    assert users == []  # no module of mtrl uses it at all (it pulls in torchvision)
