"""Property-based fuzzing (hypothesis): the row loader on random rows and the config on random dotted
overrides either work or fail with the user-error path -- a `DatasetError` naming the file and line, exit 2
with a `mtrl: config error:` message -- and never with another exception (a traceback). Each test is
bounded to well under 30 s (max_examples; no per-example deadline on this shared machine)."""

import contextlib
import io
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from mtrl.training.training_config import MTRLConfig
from mtrl.training.training_main import main
from mtrl.utils.dataset import DatasetError, RLDataset
from test_checkpoint import QUICKSTART
from test_dataset import SMALL, Tiny

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ============================================================================= the row loader

# Odd text: any code point (surrogates included: JSON escapes them), control characters, right-to-left marks,
# the placeholders the loader counts.
ODD_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "<image>", "<image><image>", "<video>", "\u202e",
                                                             "\x00", "\ud800", "🦄" * 30, "<|im_end|>", "{{ x }}"]))
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), ODD_TEXT),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
                           max_leaves=6)
IMAGE_FILES = ["ok.png", "zero.png", "garbage.png", "truncated.png", "huge.png", "one_pixel.png", "sliver.png",
               "missing.png", "", "/", ".."]
IMAGE = st.one_of(st.sampled_from(IMAGE_FILES), st.sampled_from(IMAGE_FILES[:7]),
                  st.fixed_dictionaries({"path": st.sampled_from(IMAGE_FILES)}),
                  st.fixed_dictionaries({"bytes": st.sampled_from([None, "", "not base64", "AAAA"])}), JSON_VALUES)


@st.composite
def image_row(draw):
    """A row shaped like a real one: mostly as many <image> placeholders as images, sometimes not."""
    images = draw(st.lists(IMAGE, max_size=3))
    placeholders = draw(st.sampled_from([len(images)] * 4 + [0, len(images) + 1]))
    row = {"prompt": "<image>" * placeholders + draw(ODD_TEXT), "answer": draw(ODD_TEXT), "images": images}
    if draw(st.booleans()):
        row["images"] = images[0] if len(images) == 1 else images  # one image without the list
    return row


ROW = st.one_of(
    image_row(), image_row(),
    st.fixed_dictionaries({"prompt": ODD_TEXT, "answer": ODD_TEXT}),
    JSON_VALUES,  # not an object at all
    st.fixed_dictionaries({}, optional={"prompt": st.one_of(ODD_TEXT, JSON_VALUES),
                                        "answer": st.one_of(ODD_TEXT, JSON_VALUES),
                                        "images": st.one_of(st.lists(IMAGE, max_size=3), IMAGE),
                                        "videos": st.one_of(st.lists(IMAGE, max_size=1), IMAGE),
                                        "extra": JSON_VALUES}))


def write_images(folder):
    Image.new("RGB", (40, 40), (200, 30, 30)).save(os.path.join(folder, "ok.png"))
    with open(os.path.join(folder, "ok.png"), "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "truncated.png"), "wb") as f:
        f.write(data[: len(data) // 2])
    open(os.path.join(folder, "zero.png"), "wb").close()
    with open(os.path.join(folder, "garbage.png"), "wb") as f:
        f.write(b"this is not an image")
    Image.new("RGB", (3000, 3000), (0, 90, 0)).save(os.path.join(folder, "huge.png"))  # 9 Mpx, resized down
    Image.new("RGB", (1, 1)).save(os.path.join(folder, "one_pixel.png"))
    Image.new("RGB", (2000, 2)).save(os.path.join(folder, "sliver.png"))  # an aspect ratio of 1000


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz_images"))
    write_images(folder)
    tok, proc, cfg = Tiny(tmp_path_factory).processor("qwen2_vl")

    def load(rows):
        """Build the dataset from a JSONL file of `rows` and read every item."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.jsonl")
            with open(path, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            dataset = RLDataset(path, tok, proc, cfg, image_dir=folder, max_prompt_length=128, **SMALL)
            return [dataset[i] for i in range(len(dataset))]

    return load


@settings(FUZZ, max_examples=150)
@given(rows=st.lists(ROW, min_size=1, max_size=4))
def test_random_rows_load_or_fail_with_the_file_and_line(loader, rows):
    try:
        items = loader(rows)
    except DatasetError as e:
        message = str(e)
        event(message.split(": ", 2)[-1][:30])
        assert "rows.jsonl" in message, message  # the file, and (per row) the line
        if "rows.jsonl, line" not in message:
            assert "no usable rows" in message, message
        return
    event("loaded")
    assert items and all(item["input_ids"].ndim == 1 for item in items)


# ============================================================================= the config


def dotted_keys(node, prefix=""):
    keys = []
    for key in node:
        value = node[key] if not OmegaConf.is_missing(node, key) else None
        if OmegaConf.is_dict(value):
            keys += dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


KEYS = dotted_keys(OmegaConf.structured(MTRLConfig))
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"),
                st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0]),  # a whole section
                st.text(min_size=1, max_size=12), st.sampled_from(["stages[0].training.max_steps", "stages[9].x",
                                                                  "stages[", "a..b", ".x", "=", "worker.actor."]))
VALUE = st.one_of(st.sampled_from(["", "null", "true", "0", "-1", "1e309", "nan", "[]", "[1,", "{a: 1}", "{", "]",
                                   "'", "${x}", "${training.max_steps}", "\ud800", "\x00", "🦄", "a=b", "~"]),
                  st.integers().map(str), st.floats().map(str), st.text(max_size=12))


@FUZZ
@given(overrides=st.lists(st.tuples(KEY, VALUE).map("=".join), min_size=1, max_size=3))
def test_random_dotted_overrides_are_accepted_or_exit_2_with_a_message(overrides):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([f"config={QUICKSTART}", *overrides, "print_config=true"])
    if rc == 0:
        assert "training:" in out.getvalue()
    else:
        assert rc == 2 and err.getvalue().startswith("mtrl: config error: "), (rc, err.getvalue())
