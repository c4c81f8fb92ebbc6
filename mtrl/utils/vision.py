"""Loading the images and videos of dataset rows (no network access, ever).

Images may be given as

* a path (str): absolute, or relative to the first of `search_dirs` where it exists (the dataset
  passes `image_dir` first, then the data file's folder);
* a dict as stored by Hugging Face datasets in parquet, ``{"bytes": b"...", "path": "x.png"}``
  (bytes win when present, else the path is used);
* raw ``bytes``, or a ``PIL.Image.Image``.

They are converted to RGB (transparent pixels onto white) and NOT resized here: the model's own
processor resizes them (`processor_size_kwargs`: the dataset's min_pixels / max_pixels as the
processor's `size`), exactly as transformers' and vLLM's inference paths do for the same image and
bounds, so training, rollout and serving see the same pixels. Token counts come from the image
processor's own formula (`image_token_count`), so a prompt's length is known from the image header.

Videos may be given as

* a folder of frame images or a list of frames (each as above): frames already sampled at `fps`;
* a dict ``{"frames": <folder or list>, "fps": <source fps>}``: frames recorded at the source fps,
  uniformly subsampled to `fps`;
* a video file path (str): decoded with PyAV (``pip install av``) and uniformly subsampled to `fps`.

Frames keep their size (frames of another size than the first are resized to it, so they stack)
and their number is padded to a multiple of the temporal patch size by repeating the last frame; the
video processor resizes them with the same min_pixels / max_pixels as images (Qwen3-VL's video
processor reads those bounds as the whole clip's pixel budget, its own convention).

Errors are `VisionInputError` with a reason; the dataset adds the file and line of the row.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ["VisionInputError", "Video", "resolve_path", "open_image", "image_size",
           "load_image", "processor_size_kwargs", "video_processor_kwargs", "serving_kwargs", "image_token_count",
           "load_video", "sample_frame_indices", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class VisionInputError(ValueError):
    """An image or video of a row cannot be used; the message says why (without the row's location)."""


# ----------------------------------------------------------------------------- images


def resolve_path(path: str, search_dirs: Sequence[Optional[str]]) -> str:
    """`path` itself if absolute, else the first existing `dir/path`; VisionInputError listing the tries."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if path.startswith(("http://", "https://")):
        raise VisionInputError(f"{path!r} is a URL; MTRL never downloads: store the file locally")
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(d, path) for d in search_dirs if d] or [path]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise VisionInputError(f"file not found: {path!r} (looked for {', '.join(map(repr, candidates))})")


def _describe(spec: Any) -> str:
    if isinstance(spec, str):
        return repr(spec)
    if isinstance(spec, dict):
        return f"image dict (path={spec.get('path')!r})"
    return type(spec).__name__


def open_image(spec: Any, search_dirs: Sequence[Optional[str]] = ()) -> Image.Image:
    """A lazily decoded PIL image (only the header is read) from any supported spec."""
    if isinstance(spec, Image.Image):
        return spec
    if isinstance(spec, dict):
        data = spec.get("bytes")
        if data is None and spec.get("path") is None:
            raise VisionInputError(f"image dict has neither 'bytes' nor 'path' (keys: {sorted(spec)})")
        spec = data if data is not None else spec["path"]
    try:
        if isinstance(spec, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(spec)))
        if isinstance(spec, str):
            return Image.open(resolve_path(spec, search_dirs))
    except VisionInputError:
        raise
    except Exception as e:  # PIL's UnidentifiedImageError, OSError, ...
        raise VisionInputError(f"corrupt or unreadable image {_describe(spec)}: {e}") from None
    raise VisionInputError(f"unsupported image value of type {type(spec).__name__} (use a path, "
                           f"{{'bytes': ...}}, bytes or a PIL image)")


def image_size(spec: Any, search_dirs: Sequence[Optional[str]] = ()) -> Tuple[int, int]:
    """(width, height) from the header only: cheap enough to check every row of a dataset up front."""
    with_close = not isinstance(spec, Image.Image)
    image = open_image(spec, search_dirs)
    try:
        return image.size
    finally:
        if with_close:
            image.close()


def load_image(spec: Any, search_dirs: Sequence[Optional[str]] = ()) -> Image.Image:
    """The fully decoded RGB image (transparency composited onto white)."""
    image = open_image(spec, search_dirs)
    try:
        image.load()
    except Exception as e:  # truncated / corrupt pixel data is only noticed when decoding
        raise VisionInputError(f"corrupt image {_describe(spec)}: {e}") from None
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def processor_size_kwargs(min_pixels: int, max_pixels: int) -> Dict[str, Any]:
    """The image / video processor kwargs that bound a resized image's pixel count (transformers 5's form)."""
    return {"size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}}


def video_processor_kwargs(min_pixels: int, max_pixels: int) -> Dict[str, Any]:
    """The `videos_kwargs` every engine calls the video processor with on a `Video`'s frames: resized into the
    bounds, never resampled (the frames are already sampled at `fps`) and not capped per frame beyond them."""
    return {**processor_size_kwargs(min_pixels, max_pixels), "do_sample_frames": False, "cap_pixels_per_frame": False}


def serving_kwargs(min_pixels: int, max_pixels: int) -> Dict[str, int]:
    """The same bounds in the form vLLM's `mm_processor_kwargs` (and older processors' calls) take for Qwen-VL."""
    return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


def image_token_count(image_processor: Any, height: int, width: int, min_pixels: int, max_pixels: int) -> int:
    """Vision tokens of a `width` x `height` image once the processor has resized it into [min_pixels, max_pixels]:
    the image processor's own `get_number_of_image_patches` (its `smart_resize`; the count vLLM uses too)."""
    try:
        patches = image_processor.get_number_of_image_patches(
            height, width, {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)})
    except ValueError as e:  # transformers' smart_resize refuses aspect ratios above 200
        raise VisionInputError(f"cannot resize a {width}x{height} image: {e}") from None
    return int(patches) // int(image_processor.merge_size) ** 2


# ----------------------------------------------------------------------------- videos


@dataclass
class Video:
    """Frames ready for the processor: uint8 (T, 3, H, W), T a multiple of the temporal patch size."""

    frames: torch.Tensor
    fps: float  # sampling rate of `frames` (seconds between frames = 1 / fps)

    def metadata(self):
        """transformers' VideoMetadata for the processor (Qwen2.5-VL: second_per_grid_ts, Qwen3-VL: timestamps)."""
        from transformers.video_utils import VideoMetadata

        n = int(self.frames.shape[0])
        return VideoMetadata(total_num_frames=n, fps=float(self.fps), frames_indices=list(range(n)))


def sample_frame_indices(total: int, source_fps: float, fps: float, factor: int = 2, min_frames: int = 4) -> List[int]:
    """Uniformly spaced frame indices for sampling a `source_fps` clip at `fps` (qwen-vl-utils' rule).

    The count is total / source_fps * fps, at least `min_frames` (when the clip has that many),
    at most `total`, rounded down to a multiple of `factor` (at least `factor` when possible).
    """
    if total <= 0:
        raise VisionInputError("video has no frames")
    n = total / source_fps * fps
    n = min(max(n, min_frames), total)
    n = max(int(n // factor * factor), min(factor, total))
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def _read_video_file(path: str) -> Tuple[List[Image.Image], float]:
    try:
        import av
    except ImportError:
        raise VisionInputError(f"reading video file {path!r} needs PyAV (`pip install av`); or give the video "
                               f"as a folder / list of frame images") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_image() for frame in container.decode(stream)]
    except Exception as e:
        raise VisionInputError(f"corrupt or unreadable video {path!r}: {e}") from None
    if not rate:
        raise VisionInputError(f"video {path!r} does not state its frame rate")
    return frames, float(rate)


def _folder_frames(folder: str) -> List[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise VisionInputError(f"video folder {folder!r} holds no frame images ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def load_video(spec: Any, search_dirs: Sequence[Optional[str]], fps: float, temporal_patch_size: int = 2) -> Video:
    """Decode, subsample to `fps` and pad a video given in any supported form (module docstring); the frame count
    becomes a multiple of the processor's `temporal_patch_size`."""
    source_fps: Optional[float] = None
    if isinstance(spec, dict):
        if "frames" not in spec:
            raise VisionInputError(f"video dict needs 'frames' (a folder or a list) and optionally 'fps'; "
                                   f"got keys {sorted(spec)}")
        source_fps = spec.get("fps")
        spec = spec["frames"]
    frame_dirs = search_dirs
    if isinstance(spec, str):
        path = resolve_path(spec, search_dirs)
        if os.path.isdir(path):
            frames, frame_dirs = _folder_frames(path), ()
        else:
            frames, source_fps = _read_video_file(path)
    elif isinstance(spec, (list, tuple)):
        frames = list(spec)
    else:
        raise VisionInputError(f"unsupported video value of type {type(spec).__name__} (use a file, a folder "
                               f"or a list of frames)")
    if not frames:
        raise VisionInputError("video has no frames")
    sampled_fps = float(fps)
    if source_fps:  # subsample; decode only the frames kept
        indices = sample_frame_indices(len(frames), float(source_fps), fps, factor=temporal_patch_size)
        sampled_fps = len(indices) / (len(frames) / float(source_fps))
        frames = [frames[i] for i in indices]
    images = [load_image(f, frame_dirs) for f in frames]
    size = images[0].size
    images = [im if im.size == size else im.resize(size, Image.BICUBIC) for im in images]
    images += [images[-1]] * (-len(images) % temporal_patch_size)
    frames_t = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    return Video(frames=frames_t.contiguous(), fps=sampled_fps)
