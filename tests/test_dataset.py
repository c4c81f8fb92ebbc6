"""The dataset pipeline: files and splits, vision inputs, prompt rendering, collate, rope ids, loader state.

Tiny random Qwen-VL models (`mtrl.models.tiny`) stand in for real ones; their processors are the real
transformers classes, so token counts, grids and position ids are the real thing.
"""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mtrl.models.multimodal import batch_multimodal_inputs, mm_token_type_ids
from mtrl.models.tiny import build_tiny_model
from mtrl.protocol import DataBatch
from mtrl.training.training_config import DatasetConfig
from mtrl.utils.dataset import (DatasetError, EpochSampler, RLDataset, StatefulDataLoader, build_dataloader,
                                build_dataset, collate_fn, expand_data_files)
from mtrl.utils.rope import compute_position_ids
from mtrl.utils.vision import sample_frame_indices

VL_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SMALL = dict(min_pixels=28 * 28, max_pixels=160 * 160)


# ----------------------------------------------------------------------------- fixtures


class Tiny:
    """Tiny model folders built on first use (one per architecture, shared by the module)."""

    def __init__(self, factory):
        self.factory, self.folders, self.cache = factory, {}, {}

    def folder(self, arch):
        if arch not in self.folders:
            self.folders[arch] = str(build_tiny_model(arch, self.factory.mktemp(arch) / "model"))
        return self.folders[arch]

    def processor(self, arch):
        """(tokenizer, processor or None, config)."""
        if ("proc", arch) not in self.cache:
            from transformers import AutoConfig, AutoProcessor, AutoTokenizer

            folder = self.folder(arch)
            config = AutoConfig.from_pretrained(folder)
            if arch == "qwen2":
                self.cache[("proc", arch)] = (AutoTokenizer.from_pretrained(folder), None, config)
            else:
                proc = AutoProcessor.from_pretrained(folder)
                self.cache[("proc", arch)] = (proc.tokenizer, proc, config)
        return self.cache[("proc", arch)]

    def model(self, arch):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(self.folder(arch), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory)


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_png(path, width=40, height=40, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)
    return path


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def make_dataset(tiny, arch, files_or_rows, **kwargs):
    tok, proc, cfg = tiny.processor(arch)
    options = dict(SMALL)
    options.update(kwargs)
    if isinstance(files_or_rows, list) and files_or_rows and isinstance(files_or_rows[0], dict):
        return RLDataset.from_rows(files_or_rows, tok, proc, cfg, **options)
    return RLDataset(files_or_rows, tok, proc, cfg, **options)


def mixed_rows(video_fps_frames=5):
    """Image, multi-image, text-only, video and image+video rows (PIL inputs)."""
    return [
        {"prompt": "<image>What colour is the circle?", "answer": "red", "images": [noise(56, 56, 1)]},
        {"prompt": "Compare <image> with <image> please.", "answer": "2", "images": [noise(84, 56, 2),
                                                                                  noise(40, 120, 3)]},
        {"prompt": "Just some text.", "answer": "yes"},
        {"prompt": "<video>What happens?", "answer": "x", "videos": [[noise(64, 64, s) for s in range(video_fps_frames)]]},
        {"prompt": "<image><video>Both.", "answer": "y", "images": [noise(70, 50, 9)],
         "videos": [{"frames": [noise(90, 60, 20 + s) for s in range(12)], "fps": 6}]},
    ]


def with_response(batch, response_len=6, seed=0):
    """prompt (left-padded) + a right-padded random text "response", as after generation."""
    g = torch.Generator().manual_seed(seed)
    b = batch["input_ids"].shape[0]
    resp = torch.randint(10, 500, (b, response_len), generator=g)  # ordinary tokens of the tiny vocabulary
    resp_mask = torch.ones(b, response_len, dtype=torch.long)
    for r in range(b):
        resp_mask[r, response_len - r % 3:] = 0  # ragged lengths
    resp[resp_mask == 0] = 0
    return torch.cat([batch["input_ids"], resp], 1), torch.cat([batch["attention_mask"], resp_mask], 1)


# ----------------------------------------------------------------------------- position ids vs the model


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_position_ids_and_logits_match_the_model(tiny, arch):
    """Collated prompt positions, and prompt + response positions from `compute_position_ids` on the unpadded
    part of each row, equal the model's own `get_rope_index`; a forward with them gives the same logits."""
    _, _, cfg = tiny.processor(arch)
    # video_fps 1: the pre-sampled clip gets second_per_grid_ts 2; the 12-frame 6 fps clip keeps 4 frames
    # (min 4) over 2 s, i.e. 2 fps and second_per_grid_ts 1.
    ds = make_dataset(tiny, arch, mixed_rows(), video_fps=1.0)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    mm = batch_multimodal_inputs(batch["multi_modal_inputs"])
    assert mm["image_grid_thw"].shape[0] == 4 and mm["video_grid_thw"].shape[0] == 2
    if arch == "qwen2_5_vl":
        assert mm["second_per_grid_ts"].tolist() == [2.0, 1.0]
    model = tiny.model(arch)
    grids = {k: mm.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    if arch == "qwen2_5_vl":
        grids["second_per_grid_ts"] = mm["second_per_grid_ts"]

    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm_token_type_ids(ids, cfg), attention_mask=mask,
                                        **grids)
    assert batch["position_ids"].shape == (len(ds), 3, ids.shape[1])
    assert torch.equal(ref, batch["position_ids"].transpose(0, 1))

    # prompt + response: what the worker does after generation
    full_ids, full_mask = with_response(batch)
    types = mm_token_type_ids(full_ids, cfg)
    ref, _ = model.model.get_rope_index(full_ids, mm_token_type_ids=types, attention_mask=full_mask, **grids)
    ours = torch.zeros(len(ds), 3, full_ids.shape[1], dtype=torch.long)
    for r, vision in enumerate(batch["multi_modal_inputs"]):
        valid = full_mask[r].bool()
        ours[r][:, valid] = compute_position_ids(cfg, full_ids[r][valid], vision.get("image_grid_thw"),
                                                 vision.get("video_grid_thw"), vision.get("second_per_grid_ts"))
    assert torch.equal(ref, ours.transpose(0, 1))

    with torch.no_grad():
        own = model(input_ids=full_ids, attention_mask=full_mask, mm_token_type_ids=types, **mm).logits
        model.model.rope_deltas = None
        given = model(input_ids=full_ids, attention_mask=full_mask, mm_token_type_ids=types,
                      position_ids=ours.transpose(0, 1), **mm).logits
    valid = full_mask.bool()
    torch.testing.assert_close(given[valid], own[valid], rtol=0, atol=1e-6)


def test_position_ids_errors_and_text_models(tiny):
    _, _, cfg = tiny.processor("qwen2_vl")
    img = cfg.image_token_id
    ids = torch.tensor([1, 2, img, img, img, img, 3])
    assert compute_position_ids(cfg, ids, image_grid_thw=[[1, 4, 4]]).shape == (3, 7)
    with pytest.raises(ValueError, match="does not match its grid"):
        compute_position_ids(cfg, ids, image_grid_thw=[[1, 4, 8]])
    with pytest.raises(ValueError, match="no image_grid_thw entry left"):
        compute_position_ids(cfg, ids)
    text_only = compute_position_ids(cfg, torch.tensor([5, 6, 7]))
    assert torch.equal(text_only, torch.arange(3).expand(3, 3))
    _, _, text_cfg = tiny.processor("qwen2")
    assert torch.equal(compute_position_ids(text_cfg, torch.tensor([5, 6, 7, 8])), torch.arange(4))
    as_dict = {"model_type": "qwen2_vl", "image_token_id": img, "video_token_id": cfg.video_token_id,
               "vision_config": {"spatial_merge_size": 2}}
    assert torch.equal(compute_position_ids(as_dict, ids, [[1, 4, 4]]), compute_position_ids(cfg, ids, [[1, 4, 4]]))


def test_text_model_dataset(tiny, tmp_path):
    rows = [{"prompt": "What colour is the sky?", "answer": "blue"}, {"prompt": "Hi", "answer": "x"}]
    ds = make_dataset(tiny, "qwen2", rows)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["position_ids"].shape == batch["input_ids"].shape
    short = int(ds[1]["input_ids"].shape[0])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][1].tolist() == [0] * (width - short) + [1] * short  # left padding
    assert batch["input_ids"][1, 0].item() == ds.pad_token_id
    assert batch["position_ids"][1, width - short:].tolist() == list(range(short))
    assert batch["multi_modal_inputs"][0] == {} and batch["images"][0] == []
    with pytest.raises(DatasetError, match="no image processor"):
        make_dataset(tiny, "qwen2", [{"prompt": "<image>x", "answer": "y", "images": [noise(28, 28)]}])


# ----------------------------------------------------------------------------- images and token counts


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_image_token_counts_and_resizing(tiny, arch, tmp_path):
    """For many image sizes: resized by the processor as transformers' smart_resize says (the row keeps the
    original image), one pad token per merged patch, and the length computed up front (from the image
    header) equals the processed prompt's length."""
    tok, proc, _ = tiny.processor(arch)
    ip = proc.image_processor  # patch_size 14 (Qwen3-VL: 16), merge_size 2
    sizes = [(20, 20), (56, 56), (100, 60), (300, 200), (33, 517), (640, 480)]
    rows = []
    for k, (w, h) in enumerate(sizes):
        save_png(str(tmp_path / f"img{k}.png"), w, h)
        rows.append({"prompt": "<image>Describe.", "answer": "a", "images": [f"img{k}.png"]})
    ds = make_dataset(tiny, arch, write_jsonl(tmp_path / "rows.jsonl", rows), min_pixels=28 * 28,
                      max_pixels=256 * 256)
    for k, (w, h) in enumerate(sizes):
        item = ds[k]
        exp_h, exp_w = smart_resize(h, w, factor=ip.patch_size * ip.merge_size, min_pixels=28 * 28, max_pixels=256 * 256)
        assert item["images"][0].size == (w, h)
        grid = item["multi_modal_inputs"]["image_grid_thw"]
        assert grid.tolist() == [[1, exp_h // ip.patch_size, exp_w // ip.patch_size]]
        n_pad = int((item["input_ids"] == proc.image_token_id).sum())
        assert n_pad == int(grid.prod()) // ip.merge_size ** 2
        assert ds.prompt_lengths[k] == item["input_ids"].shape[0]
        assert item["multi_modal_inputs"]["pixel_values"].shape[0] == int(grid.prod())


def test_image_forms_and_path_resolution(tiny, tmp_path):
    data_dir, image_dir = tmp_path / "data", tmp_path / "imgs"
    save_png(str(image_dir / "a.png"), colour=(255, 0, 0))
    save_png(str(data_dir / "b.png"), colour=(0, 255, 0))
    buf = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 255, 255)).save(buf, format="PNG")
    rows = [{"prompt": "<image>", "answer": "a", "images": ["a.png"]},  # found in image_dir
            {"prompt": "<image>", "answer": "b", "images": "b.png"},  # a single value; found next to the data
            {"prompt": "<image>", "answer": "d", "images": [{"bytes": None, "path": str(image_dir / "a.png")}]}]
    ds = make_dataset(tiny, "qwen2_vl", write_jsonl(data_dir / "rows.jsonl", rows), image_dir=str(image_dir))
    assert [ds[i]["images"][0].getpixel((5, 5)) for i in range(3)] == [(255, 0, 0), (0, 255, 0), (255, 0, 0)]

    in_memory = [{"prompt": "<image>", "answer": "c", "images": [{"bytes": buf.getvalue(), "path": "ignored.png"}]},
                 {"prompt": "<image>", "answer": "e", "images": [buf.getvalue()]},
                 {"prompt": "<image>", "answer": "f", "images": [Image.new("RGBA", (40, 40), (0, 0, 0, 0))]}]
    ds = make_dataset(tiny, "qwen2_vl", in_memory)
    assert [ds[i]["images"][0].getpixel((5, 5)) for i in range(3)] == [(0, 0, 255), (0, 0, 255), (255, 255, 255)]


def test_placeholders_system_and_format_prompt(tiny, tmp_path):
    tok, proc, _ = tiny.processor("qwen2_vl")
    template = tmp_path / "fmt.jinja"
    template.write_text("{{ content }} Think first.\n")
    rows = [{"prompt": "Is <image> like <image>?", "answer": "no", "images": [noise(28, 28), noise(28, 28, 1)]},
            {"prompt": "What colour?", "answer": "red", "images": [noise(28, 28)]}]
    ds = make_dataset(tiny, "qwen2_vl", rows, system_prompt="Be brief.", format_prompt=str(template))
    text = tok.decode(ds[0]["input_ids"])
    assert "Be brief." in text and "Think first." in text
    assert "Is <|vision_start|><|image_pad|><|vision_end|> like <|vision_start|>" in text
    no_placeholder = tok.decode(ds[1]["input_ids"])  # image first, then the text
    assert "user\n<|vision_start|><|image_pad|><|vision_end|>What colour? Think first." in no_placeholder
    inline = make_dataset(tiny, "qwen2_vl", rows[1:], format_prompt="Q: {{ content }}")
    assert "Q: What colour?" in tok.decode(inline[0]["input_ids"])
    with pytest.raises(DatasetError, match="content"):
        make_dataset(tiny, "qwen2_vl", rows[1:], format_prompt="no placeholder")
    with pytest.raises(DatasetError, match=r"<rows>, row 1: the prompt has 1 <image> .* 2 images"):
        make_dataset(tiny, "qwen2_vl", [{"prompt": "<image>?", "answer": "a", "images": [noise(28, 28)] * 2}])


# ----------------------------------------------------------------------------- videos


def test_videos_from_frames(tiny, tmp_path):
    tok, proc, _ = tiny.processor("qwen2_5_vl")
    frames_dir = tmp_path / "clip"
    for k in range(6):
        save_png(str(frames_dir / f"f{k:02d}.png"), 56, 56, colour=(40 * k, 0, 0))
    rows = [{"prompt": "<video>What happens?", "answer": "a", "videos": ["clip"]},  # folder, sampled at video_fps
            {"prompt": "<video>?", "answer": "b", "videos": [{"frames": "clip", "fps": 6}]}]  # 6 fps -> 2 fps
    ds = make_dataset(tiny, "qwen2_5_vl", write_jsonl(tmp_path / "rows.jsonl", rows), video_fps=2.0)
    first, second = ds[0]["multi_modal_inputs"], ds[1]["multi_modal_inputs"]
    assert first["video_grid_thw"].tolist() == [[3, 4, 4]]  # 6 frames / temporal patch 2
    assert second["video_grid_thw"].tolist() == [[2, 4, 4]]  # 1 second at 2 fps = 2 frames, min 4 frames -> 4
    assert first["second_per_grid_ts"].tolist() == [1.0]
    n_pad = int((ds[0]["input_ids"] == proc.video_token_id).sum())
    assert n_pad == int(first["video_grid_thw"].prod()) // 4
    assert ds.prompt_lengths == [int(ds[i]["input_ids"].shape[0]) for i in range(2)]
    assert sample_frame_indices(30, 30.0, 2.0) == [0, 10, 19, 29]  # 1 s at 2 fps, at least 4 frames
    assert sample_frame_indices(3, 30.0, 2.0) == [0, 2]


def test_video_file_is_sampled_at_video_fps(tiny, tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:  # 3 s at 10 fps
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    ds = make_dataset(tiny, "qwen2_vl", [{"prompt": "<video>?", "answer": "a", "videos": [path]}], video_fps=2.0)
    assert ds[0]["multi_modal_inputs"]["video_grid_thw"].tolist() == [[3, 4, 4]]  # 3 s * 2 fps = 6 frames


# ----------------------------------------------------------------------------- files, splits, formats


def test_folder_split_parquet_and_json_inputs(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "ds"
    write_jsonl(root / "train.jsonl", [{"prompt": f"t{i}", "answer": str(i)} for i in range(3)])
    write_jsonl(root / "val.jsonl", [{"prompt": "v", "answer": "0"}])
    assert [os.path.basename(f) for f, _ in expand_data_files(f"{root}@train")] == ["train.jsonl"]
    assert len(make_dataset(tiny, "qwen2_vl", f"{root}@train")) == 3
    assert len(make_dataset(tiny, "qwen2_vl", str(root))) == 4  # the whole folder
    assert len(make_dataset(tiny, "qwen2_vl", f"{root}@train, {root}@val")) == 4  # a comma list

    hf = tmp_path / "hf"
    (hf / "data").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), (0, 200, 0)).save(buf, format="PNG")
    table = pa.table({"question": ["<image>colour?", "<image>colour again?"], "label": ["green", "green"],
                      "pics": [[{"bytes": buf.getvalue(), "path": None}]] * 2})
    pq.write_table(table, hf / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), hf / "data" / "test-00000-of-00001.parquet")
    ds = make_dataset(tiny, "qwen2_vl", f"{hf}@train", prompt_key="question", answer_key="label", image_key="pics")
    assert len(ds) == 2 and ds[1]["ground_truth"] == "green"
    assert ds[1]["images"][0].getpixel((3, 3)) == (0, 200, 0)
    assert len(make_dataset(tiny, "qwen2_vl", f"{hf}@test", prompt_key="question", answer_key="label",
                            image_key="pics")) == 1

    mapping = tmp_path / "splits.json"
    mapping.write_text(json.dumps({"train": [{"prompt": "a", "answer": 1}], "test": []}))
    ds = make_dataset(tiny, "qwen2_vl", f"{mapping}@train")
    assert ds[0]["ground_truth"] == "1"
    column = write_jsonl(tmp_path / "col.jsonl", [{"prompt": "a", "answer": "x", "split": s} for s in "abb"])
    assert len(make_dataset(tiny, "qwen2_vl", f"{column}@b")) == 2
    with pytest.raises(DatasetError, match="no split 'dev'"):
        make_dataset(tiny, "qwen2_vl", f"{mapping}@dev")
    with pytest.raises(DatasetError, match="has no files of split 'dev'"):
        make_dataset(tiny, "qwen2_vl", f"{root}@dev")
    with pytest.raises(DatasetError, match="does not exist"):
        make_dataset(tiny, "qwen2_vl", str(tmp_path / "nope.jsonl"))


def png_bytes(colour, size=(30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def hub_style_table(n=3):
    """Rows as Hub datasets store them: an `images` list of {"bytes", "path"} (geometry3k, ViRL39K) and a
    single `image` dict (MMK12)."""
    import pyarrow as pa

    colours = [(10 * i, 200, 0) for i in range(n)]
    return pa.table({"problem": [f"<image>What colour is shape {i}?" for i in range(n)],
                     "answer": [str(i) for i in range(n)],
                     "images": [[{"bytes": png_bytes(c), "path": f"{i}.png"}] for i, c in enumerate(colours)],
                     "image": [{"bytes": png_bytes(c), "path": None} for c in colours]}), colours


def save_to_disk_layout(folder, table, splits=None):
    """A folder as `datasets`' save_to_disk writes it: Dataset = state.json + dataset_info.json + Arrow stream
    files; DatasetDict = dataset_dict.json + one such folder per split."""
    import pyarrow as pa

    if splits is not None:
        folder.mkdir(parents=True)
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
        for name, part in splits.items():
            save_to_disk_layout(folder / name, part)
        return str(folder)
    folder.mkdir(parents=True)
    halves = [table.slice(0, (table.num_rows + 1) // 2), table.slice((table.num_rows + 1) // 2)]
    names = [f"data-{k:05d}-of-00002.arrow" for k in range(2)]
    for name, part in zip(names, halves):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_format_type": None, "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return str(folder)


def test_hub_parquet_image_bytes_single_and_list(tiny, tmp_path):
    import pyarrow.parquet as pq

    table, colours = hub_style_table()
    (tmp_path / "geo" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "geo" / "data" / "train-00000-of-00001.parquet")
    for image_key in ("images", "image"):
        ds = make_dataset(tiny, "qwen2_vl", f"{tmp_path / 'geo'}@train", prompt_key="problem", image_key=image_key)
        assert len(ds) == 3 and [ds[i]["ground_truth"] for i in range(3)] == ["0", "1", "2"]
        assert [ds[i]["images"][0].getpixel((3, 3)) for i in range(3)] == colours
        assert ds[2]["multi_modal_inputs"]["image_grid_thw"].tolist() == [[1, 2, 2]]  # 30x30 -> 28x28, 2x2 patches


def test_save_to_disk_folders_dataset_and_dataset_dict(tiny, tmp_path):
    table, colours = hub_style_table(4)
    saved = save_to_disk_layout(tmp_path / "saved", table)
    assert expand_data_files(saved) == [(saved, None)]
    ds = make_dataset(tiny, "qwen2_vl", saved, prompt_key="problem")
    assert len(ds) == 4 and [ds[i]["images"][0].getpixel((3, 3)) for i in range(4)] == colours  # both Arrow files
    assert str(ds.source(3)) == f"{saved}, row 4"
    splits = save_to_disk_layout(tmp_path / "dict", None, {"train": table.slice(0, 3), "test": table.slice(3)})
    train = make_dataset(tiny, "qwen2_vl", f"{splits}@train", prompt_key="problem")
    test = make_dataset(tiny, "qwen2_vl", f"{splits}@test", prompt_key="problem")
    assert (len(train), len(test)) == (3, 1) and test[0]["ground_truth"] == "3"
    with pytest.raises(DatasetError, match=r"splits \['train', 'test'\]; select one with"):
        make_dataset(tiny, "qwen2_vl", splits, prompt_key="problem")
    with pytest.raises(DatasetError, match=r"no split 'dev'; the saved DatasetDict has \['train', 'test'\]"):
        make_dataset(tiny, "qwen2_vl", f"{splits}@dev", prompt_key="problem")
    os.remove(os.path.join(saved, "data-00001-of-00002.arrow"))
    with pytest.raises(DatasetError, match="cannot read the saved dataset"):
        make_dataset(tiny, "qwen2_vl", saved, prompt_key="problem")


def test_hub_dataset_ids_are_not_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand_data_files("hiyouga/geometry3k@train, org/mmk12:default@test") == [
        ("hiyouga/geometry3k@train", None), ("org/mmk12:default@test", None)]
    with pytest.raises(DatasetError, match="does not exist"):  # a missing file is not taken for a Hub id
        expand_data_files("data/train.jsonl")


def test_hub_dataset_without_the_datasets_library_says_how(tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DatasetError, match=r"needs the `datasets` library .*hf download hiyouga/geometry3k "
                                           r"--repo-type dataset"):
        make_dataset(tiny, "qwen2_vl", "hiyouga/geometry3k@train", prompt_key="problem")


def test_hub_id_and_save_to_disk_with_the_datasets_library(tiny, tmp_path, monkeypatch):
    """The real library: a DatasetDict saved with save_to_disk, and a Hub id (load_dataset pointed at local
    Parquet files, as the Hub serves them) with an Image-feature column."""
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    table, colours = hub_style_table()
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": (getattr(datasets, "List", None) or datasets.Sequence)(datasets.Image()),
                                  "image": datasets.Image()})
    built = datasets.Dataset.from_dict(table.to_pydict(), features=features)
    datasets.DatasetDict({"train": built, "test": built.select([0])}).save_to_disk(str(tmp_path / "saved"))
    ds = make_dataset(tiny, "qwen2_vl", f"{tmp_path / 'saved'}@train", prompt_key="problem")
    assert [ds[i]["images"][0].getpixel((3, 3)) for i in range(3)] == colours
    (tmp_path / "parquet").mkdir()
    pq.write_table(table, tmp_path / "parquet" / "train.parquet")
    real_load = datasets.load_dataset
    calls = []

    def load_local(repo, config=None, split=None):
        calls.append((repo, config, split))
        return real_load("parquet", data_files={"train": str(tmp_path / "parquet" / "train.parquet")}, split=split)

    monkeypatch.setattr(datasets, "load_dataset", load_local)
    ds = make_dataset(tiny, "qwen2_vl", "hiyouga/geometry3k:default@train", prompt_key="problem", image_key="image")
    assert calls == [("hiyouga/geometry3k", "default", "train")]
    assert [ds[i]["images"][0].getpixel((3, 3)) for i in range(3)] == colours


def test_build_dataset_from_config(tiny, tmp_path):
    tok, proc, cfg = tiny.processor("qwen2_vl")
    save_png(str(tmp_path / "a.png"))
    files = write_jsonl(tmp_path / "d" / "rows.jsonl", [{"q": "<image>colour?", "a": "red", "images": ["a.png"]}])
    config = DatasetConfig(train_files=files, prompt_key="q", answer_key="a", image_dir=str(tmp_path),
                           min_pixels=3136, max_pixels=3136, max_prompt_length=96)
    ds = build_dataset(config.train_files, config, tok, proc)  # model config read from the tokenizer's folder
    assert ds.model_config.model_type == "qwen2_vl"
    assert ds[0]["images"][0].size == (40, 40) and ds[0]["ground_truth"] == "red"  # the processor resizes:
    assert ds[0]["multi_modal_inputs"]["image_grid_thw"].tolist() == [[1, 4, 4]]  # 40x40 -> 56x56 (min_pixels)


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_name_file_line_and_reason(tiny, tmp_path, caplog):
    save_png(str(tmp_path / "ok.png"))
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    good = {"prompt": "<image>?", "answer": "a", "images": ["ok.png"]}

    def check(bad_row, match, **kwargs):
        path = write_jsonl(tmp_path / "rows.jsonl", [good, good, bad_row])
        with pytest.raises(DatasetError, match=match) as err:
            make_dataset(tiny, "qwen2_vl", path, **kwargs)
        assert "rows.jsonl, line 3" in str(err.value)

    check({"answer": "a"}, "missing key 'prompt'")
    check({"prompt": "?", "images": []}, "missing key 'answer'")
    check({"prompt": "<image>?", "answer": "a", "images": ["missing.png"]}, "file not found: 'missing.png'")
    check({"prompt": "<image>?", "answer": "a", "images": ["garbage.png"]}, "corrupt or unreadable image")
    long_prompt = {"prompt": "word " * 300, "answer": "a"}
    check(long_prompt, r"the prompt is \d+ tokens long, more than max_prompt_length=64",
          max_prompt_length=64, filter_overlong_prompts=False)
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DatasetError, match="broken.jsonl, line 2: invalid JSON"):
        make_dataset(tiny, "qwen2_vl", str(tmp_path / "broken.jsonl"))

    # over-long prompts with filtering on: dropped, counted and logged
    path = write_jsonl(tmp_path / "rows.jsonl", [good, long_prompt, good, long_prompt])
    with caplog.at_level(logging.WARNING, logger="mtrl.utils.dataset"):
        ds = make_dataset(tiny, "qwen2_vl", path, max_prompt_length=64, filter_overlong_prompts=True)
    assert len(ds) == 2 and ds.num_filtered == 2
    assert "dropped 2 of 4 rows" in caplog.text and "rows.jsonl, line 2" in caplog.text
    assert ds.source(1).number == 3

    # a corrupt image whose header reads fine is reported when the row is loaded
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    ds = make_dataset(tiny, "qwen2_vl", write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "<image>?", "answer": "a", "images": ["truncated.png"]}]))
    with pytest.raises(DatasetError, match=r"rows.jsonl, line 1: corrupt image"):
        ds[0]


# ----------------------------------------------------------------------------- collate and loader


class _Rows:
    """A dataset stand-in with cheap items, for loader tests."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.arange(1, 2 + i % 3)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(len(ids)),
                "multi_modal_inputs": {}, "raw_prompt": f"p{i}", "ground_truth": "", "images": [], "videos": [],
                "mm_processor_kwargs": {}, "index": i, "uid": str(i)}


def _indices(batches):
    return [list(b["index"]) for b in batches]


def test_loader_state_resumes_with_the_same_continuation():
    data = _Rows(10)
    loader = StatefulDataLoader(data, batch_size=3, shuffle=True, seed=7)  # drop_last: 3 batches / epoch
    assert len(loader) == 3
    stream = iter(loader)
    _ = [next(stream) for _ in range(2)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["offset"] == 6
    expected = _indices([next(stream)]) + _indices(list(loader)) + _indices(list(loader))  # rest, epochs 1, 2

    resumed = StatefulDataLoader(_Rows(10), batch_size=3, shuffle=True, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    got = _indices(list(resumed)) + _indices(list(resumed)) + _indices(list(resumed))
    assert got == expected
    assert resumed.epoch == 3


def test_loader_order_uids_and_sizes():
    orders = [EpochSampler(20, True, 1).order(e).tolist() for e in (0, 1)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(20))
    assert EpochSampler(20, True, 1).order(0).tolist() == orders[0]  # deterministic
    assert EpochSampler(5, False, 1).order(3).tolist() == list(range(5))

    loader = build_dataloader(_Rows(7), batch_size=3, shuffle=False)  # no shuffle: keeps the last batch
    first = list(loader)
    assert _indices(first) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(first[0]["uid"]) == ["0-0", "0-1", "0-2"]
    assert list(list(loader)[0]["uid"]) == ["1-0", "1-1", "1-2"]  # unique across epochs
    assert first[0]["input_ids"].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3]]  # left padded with 0
    whole = build_dataloader(_Rows(7), batch_size=-1, shuffle=False)  # val_batch_size = -1
    assert len(whole) == 1 and len(next(iter(whole))) == 7
    with pytest.raises(DatasetError, match="larger than the dataset"):
        build_dataloader(_Rows(2), batch_size=4, shuffle=True)

    # two iterators share the position: extra batches are not repeated by the main loop
    loader = build_dataloader(_Rows(9), batch_size=3, shuffle=False)
    main, extra = iter(loader), iter(loader)
    assert _indices([next(main), next(extra), next(main)]) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_collate_layout_for_a_vl_batch(tiny):
    ds = make_dataset(tiny, "qwen2_vl", mixed_rows()[:3])
    loader = build_dataloader(ds, batch_size=3, shuffle=False)
    batch = next(iter(loader))
    assert isinstance(batch, DataBatch)
    assert set(batch.non_tensors) == {"multi_modal_inputs", "raw_prompt", "ground_truth", "images", "videos",
                                      "mm_processor_kwargs", "index", "uid"}
    assert batch["position_ids"].dim() == 3 and batch["position_ids"].shape[1] == 3
    assert batch["multi_modal_inputs"][2] == {} and len(batch["images"][1]) == 2
    assert list(batch["ground_truth"]) == ["red", "2", "yes"]
    lengths = batch["attention_mask"].sum(1)
    for r in range(3):  # left padded, positions zero on padding
        pad = batch["input_ids"].shape[1] - int(lengths[r])
        assert batch["attention_mask"][r, :pad].sum() == 0 and batch["position_ids"][r, :, :pad].abs().sum() == 0
    assert collate_fn([ds[0]], pad_token_id=ds.pad_token_id)["input_ids"].shape[0] == 1
