"""Supervised (SFT / CHORD expert) and preference (DPO / reward model) datasets, with images.

Both build on `RLDataset` (mtrl/utils/dataset.py): the same files, `path@split`, image loading and
resizing, chat-template rendering, row checks with file/line in every error, and prompt-length
filtering. Items are whole sequences, collated into the post-generation layout of
docs/DATA_LAYOUT.md (``prompts`` left-padded, ``responses`` right-padded, ``input_ids``,
``attention_mask``, ``position_ids`` of the whole sequence, ``response_mask``), so the actor's
`forward_micro_batch` scores them exactly like rollouts.

SFT rows (recognised automatically, first match wins; keys renamable where noted):

* ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}``
  (also ``conversations``, and ShareGPT ``{"from": "human"|"gpt", "value": ...}``): the last assistant
  message is the response, everything before it the prompt (earlier assistant turns get no loss);
* ``{prompt_key: ..., response_key: ...}`` (default ``prompt`` / ``response``);
* ``{prompt_key: ..., answer_key: ...}`` (the RL row format: the answer is the response, e.g. the
  built-in shapes task's rows);
* ``{"question": ..., "answer": ...}``, ``{"instruction": ..., ["input": ...,] "output": ...}``,
  ``{"input": ..., "output": ...}``, ``{"query": ..., "response": ...}``.

Images / videos come from ``image_key`` / ``video_key`` of the row; ``<image>`` placeholders in the
prompt (in any message) place them, else they come first in the (first) user message.

The response is tokenized as the chat template renders an assistant turn (for Qwen:
``red<|im_end|>``) and cut after its end-of-turn token, so the model learns to stop; responses
longer than ``max_response_length`` tokens are cut (counted in ``num_truncated``).

Preference rows: ``{prompt (or question / messages), chosen_key: "...", rejected_key: "...",
[images], [margin]}``; a pair becomes two rows (chosen, rejected) of a batch, interleaved
``c0 r0 c1 r1 ...``, with ``pair_margin`` (the row's margin, 0 when absent).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mtrl.protocol import DataBatch
from mtrl.utils.dataset import RLDataset, DatasetError, RowSource, _PLACEHOLDER, _as_list
from mtrl.utils.logger import get_logger
from mtrl.utils.rope import compute_position_ids

logger = get_logger(__name__)

__all__ = ["SFTDataset", "PreferenceDataset", "normalise_sft_row", "collate_sequences", "pad_sequences",
           "build_sft_dataset", "build_preference_dataset"]

_MESSAGE_KEYS = ("messages", "conversations")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                 "model": "assistant", "system": "system"}
_PAIR_SHAPES = (("question", "answer"), ("instruction", "output"), ("input", "output"), ("query", "response"))


def _message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts (image parts become <image>)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                out.append("<image>")
            elif isinstance(part, dict) and part.get("type") == "video":
                out.append("<video>")
        return "".join(out)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _messages(value: Any, where: str) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: message {k} is not an object")
        role = m.get("role", m.get("from"))
        if role not in _ROLE_ALIASES:
            raise DatasetError(f"{where}: message {k} has role {role!r}; use system / user / assistant")
        try:
            text = _message_text(m.get("content", m.get("value", "")))
        except ValueError as e:
            raise DatasetError(f"{where}: message {k}: {e}") from None
        out.append({"role": _ROLE_ALIASES[role], "content": text})
    return out


def normalise_sft_row(row: Any, where: str = "row", prompt_key: str = "prompt", response_key: str = "response",
                      answer_key: str = "answer") -> Tuple[Any, str]:
    """(prompt: str or list of messages, response: str) of an SFT row in any supported shape."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be an object with keys, got {type(row).__name__}")
    for key in _MESSAGE_KEYS:
        if key in row:
            messages = _messages(row[key], where)
            if messages[-1]["role"] != "assistant":
                raise DatasetError(f"{where}: the last message must be the assistant's response (got "
                                   f"{messages[-1]['role']!r})")
            if not any(m["role"] == "user" for m in messages[:-1]):
                raise DatasetError(f"{where}: `{key}` has no user message before the response")
            return messages[:-1], messages[-1]["content"]
    shapes = [(prompt_key, response_key), (prompt_key, answer_key), *_PAIR_SHAPES]
    for p_key, r_key in shapes:
        if p_key in row and r_key in row:
            prompt, response = row[p_key], row[r_key]
            if p_key == "instruction" and row.get("input") and r_key == "output":
                prompt = f"{prompt}\n\n{row['input']}"
            if not isinstance(prompt, str):
                raise DatasetError(f"{where}: {p_key!r} must be a string, got {type(prompt).__name__}")
            if isinstance(response, (int, float)) and not isinstance(response, bool):
                response = str(response)
            if not isinstance(response, str):
                raise DatasetError(f"{where}: {r_key!r} must be a string, got {type(response).__name__}")
            return prompt, response
    known = ", ".join(f"{a}/{b}" for a, b in shapes)
    raise DatasetError(f"{where}: not an SFT row: expected `messages` or one of the key pairs {known}; the row has "
                       f"{sorted(row)} (set dataset.prompt_key / response_key to rename)")


class SFTDataset(RLDataset):
    """Prompt + response sequences for supervised training (module docstring); `__getitem__` adds
    ``responses`` (R,) and ``full_position_ids`` to the RLDataset item."""

    _warn_missing_answers = False

    def __init__(self, data_files, tokenizer, processor=None, model_config=None, *, response_key: str = "response",
                 max_response_length: int = 512, **kwargs):
        self.response_key = response_key
        self.max_response_length = int(max_response_length)
        self.num_truncated = 0
        super().__init__(data_files, tokenizer, processor, model_config, **kwargs)
        self._stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                          if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id}

    @classmethod
    def from_config(cls, data_files, config, tokenizer, processor=None, model_config=None, **extra):
        return cls(data_files, tokenizer, processor, model_config, response_key=config.response_key,
                   max_response_length=config.max_response_length, prompt_key=config.prompt_key,
                   answer_key=config.answer_key, image_key=config.image_key, video_key=config.video_key,
                   image_dir=config.image_dir, video_fps=config.video_fps, min_pixels=config.min_pixels,
                   max_pixels=config.max_pixels, max_prompt_length=config.max_prompt_length,
                   filter_overlong_prompts=config.filter_overlong_prompts, format_prompt=config.format_prompt,
                   system_prompt=config.system_prompt, **extra)

    # ------------------------------------------------------------------ rows

    def _target(self, row: Dict[str, Any], where: str) -> Any:
        return normalise_sft_row(row, where, self.prompt_key, self.response_key, self.answer_key)[1]

    def _fields(self, row: Any, source: RowSource) -> Tuple[Any, Any, List[Any], List[Any]]:
        """(prompt: str or messages, target, images, videos)."""
        if not isinstance(row, dict):
            raise DatasetError(f"{source}: a row must be an object with keys, got {type(row).__name__}")
        prompt, target = self._prompt_of(row, source), self._target(row, str(source))
        images, videos = _as_list(row.get(self.image_key)), _as_list(row.get(self.video_key))
        if (images or videos) and self.processor is None:
            raise DatasetError(f"{source}: the row has images/videos but the model has no image processor "
                               f"(a text-only model?)")
        return prompt, target, images, videos

    def _prompt_of(self, row: Dict[str, Any], source: RowSource) -> Any:
        return normalise_sft_row(row, str(source), self.prompt_key, self.response_key, self.answer_key)[0]

    # ------------------------------------------------------------------ rendering

    def _message_list(self, prompt: Any, n_images: int, n_videos: int, where: str) -> Tuple[List[dict], Any]:
        """Chat messages (content as parts for vision models) and the object whose chat template renders them."""
        if isinstance(prompt, str):
            if self._format is not None:
                try:
                    prompt = self._format.render(content=prompt)
                except Exception as e:
                    raise DatasetError(f"{where}dataset.format_prompt failed: {e}") from None
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        owner = self.processor if self.processor is not None else self.tokenizer
        if getattr(owner, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DatasetError("the tokenizer has no chat template; MTRL renders every prompt with one")
        if self.processor is None:
            return messages, owner
        n_img_ph = sum(_PLACEHOLDER.split(m["content"]).count("<image>") for m in messages)
        n_vid_ph = sum(_PLACEHOLDER.split(m["content"]).count("<video>") for m in messages)
        if (n_img_ph, n_vid_ph) == (0, 0):
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            for i, m in enumerate(messages):
                parts = self._content_parts(m["content"], n_images if i == first_user else 0,
                                            n_videos if i == first_user else 0, where)
                messages[i] = {"role": m["role"], "content": parts}
            return messages, owner
        if (n_img_ph, n_vid_ph) != (n_images, n_videos):
            raise DatasetError(f"{where}the prompt has {n_img_ph} <image> and {n_vid_ph} <video> placeholders but "
                               f"the row has {n_images} images and {n_videos} videos")
        for i, m in enumerate(messages):
            pieces = _PLACEHOLDER.split(m["content"])
            messages[i] = {"role": m["role"], "content": self._content_parts(
                m["content"], pieces.count("<image>"), pieces.count("<video>"), where)}
        return messages, owner

    def render_prompt(self, prompt: Any, n_images: int = 0, n_videos: int = 0,
                      source: Optional[RowSource] = None) -> str:
        messages, owner = self._message_list(prompt, n_images, n_videos, f"{source}: " if source else "")
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def response_ids(self, prompt: Any, response: str, n_images: int = 0, n_videos: int = 0,
                     source: Optional[RowSource] = None) -> torch.Tensor:
        """Token ids of `response` as the chat template renders an assistant turn after `prompt`, ending with
        the end-of-turn token, at most max_response_length long."""
        messages, owner = self._message_list(prompt, n_images, n_videos, f"{source}: " if source else "")
        head = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assistant = {"role": "assistant",
                     "content": response if self.processor is None else [{"type": "text", "text": response}]}
        full = owner.apply_chat_template(messages + [assistant], tokenize=False)
        text = full[len(head):] if full.startswith(head) else response + (self.tokenizer.eos_token or "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        stops = [i for i, t in enumerate(ids) if t in self._stop_ids]
        if stops:
            ids = ids[:stops[-1] + 1]  # drop what follows the end of the turn (a newline)
        elif self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        if not ids:
            raise DatasetError(f"{source}: the response is empty after tokenization")
        if len(ids) > self.max_response_length:
            self.num_truncated += 1
            ids = ids[:self.max_response_length]
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------ items

    def _sequence(self, item: Dict[str, Any], response: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(full position ids, response) for the prompt of `item` followed by `response`."""
        mm = item["multi_modal_inputs"]
        full = torch.cat([item["input_ids"], response])
        pos = compute_position_ids(self.model_config, full, image_grid_thw=mm.get("image_grid_thw"),
                                   video_grid_thw=mm.get("video_grid_thw"),
                                   second_per_grid_ts=mm.get("second_per_grid_ts"))
        return pos, response

    def _row_fields(self, index: int):
        t, i = self._rows[index]
        table = self._tables[t]
        source = table.source(i)
        return (*self._fields(table.row(i), source), source, table.row(i))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = super().__getitem__(index)
        prompt, response, images, videos, source, _ = self._row_fields(index)
        ids = self.response_ids(prompt, response, len(images), len(videos), source)
        item["full_position_ids"], item["responses"] = self._sequence(item, ids)
        item["raw_prompt"] = prompt if isinstance(prompt, str) else _message_text_of(prompt)
        return item

    def collate(self, items: Sequence[Dict[str, Any]]) -> DataBatch:
        batch = collate_sequences(items, self.pad_token_id)
        batch.tensors["is_expert"] = torch.ones(len(items), dtype=torch.float32)
        return batch


def _message_text_of(messages: List[Dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


class PreferenceDataset(SFTDataset):
    """Preference pairs {prompt, chosen, rejected, [images], [margin]} (module docstring)."""

    def __init__(self, data_files, tokenizer, processor=None, model_config=None, *, chosen_key: str = "chosen",
                 rejected_key: str = "rejected", margin_key: str = "margin", **kwargs):
        self.chosen_key, self.rejected_key, self.margin_key = chosen_key, rejected_key, margin_key
        super().__init__(data_files, tokenizer, processor, model_config, **kwargs)

    @classmethod
    def from_config(cls, data_files, config, tokenizer, processor=None, model_config=None, margin_key="margin"):
        return super().from_config(data_files, config, tokenizer, processor, model_config,
                                   chosen_key=config.chosen_key, rejected_key=config.rejected_key,
                                   margin_key=margin_key)

    def _response_text(self, value: Any, key: str, where: str) -> str:
        if isinstance(value, list):  # a conversation: its last assistant message
            messages = _messages(value, where)
            value = messages[-1]["content"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DatasetError(f"{where}: {key!r} must be a string or a list of messages")
        return value

    def _target(self, row: Dict[str, Any], where: str) -> Tuple[str, str, float]:
        for key in (self.chosen_key, self.rejected_key):
            if key not in row:
                raise DatasetError(f"{where}: missing key {key!r} of a preference row (the row has {sorted(row)}; "
                                   f"set dataset.chosen_key / rejected_key to rename)")
        margin = row.get(self.margin_key, 0.0)
        try:
            margin = float(margin or 0.0)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: {self.margin_key!r} must be a number") from None
        return (self._response_text(row[self.chosen_key], self.chosen_key, where),
                self._response_text(row[self.rejected_key], self.rejected_key, where), margin)

    def _prompt_of(self, row: Dict[str, Any], source: RowSource) -> Any:
        for key in _MESSAGE_KEYS:
            if key in row:
                messages = _messages(row[key], str(source))
                return messages[:-1] if messages[-1]["role"] == "assistant" else messages
        for key in (self.prompt_key, "question", "instruction", "input", "query"):
            if key in row:
                if not isinstance(row[key], str):
                    raise DatasetError(f"{source}: {key!r} must be a string")
                return row[key]
        raise DatasetError(f"{source}: a preference row needs a prompt ({self.prompt_key!r}, `question` or "
                           f"`messages`); the row has {sorted(row)}")

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = RLDataset.__getitem__(self, index)
        prompt, (chosen, rejected, margin), images, videos, source, _ = self._row_fields(index)
        item["raw_prompt"] = prompt if isinstance(prompt, str) else _message_text_of(prompt)
        item["ground_truth"] = chosen
        item["pair"] = []
        for text in (chosen, rejected):
            ids = self.response_ids(prompt, text, len(images), len(videos), source)
            item["pair"].append(self._sequence(item, ids))
        item["margin"] = margin
        return item

    def collate(self, items: Sequence[Dict[str, Any]]) -> DataBatch:
        rows = []
        for it in items:
            for k, (pos, resp) in enumerate(it["pair"]):
                rows.append({**it, "full_position_ids": pos, "responses": resp, "is_chosen": 1.0 - k})
        batch = collate_sequences(rows, self.pad_token_id)
        batch.tensors["is_chosen"] = torch.tensor([r["is_chosen"] for r in rows], dtype=torch.float32)
        batch.tensors["pair_margin"] = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32)
        return batch


# ============================================================================= collate and padding


def collate_sequences(items: Sequence[Dict[str, Any]], pad_token_id: int = 0) -> DataBatch:
    """Items with a prompt (``input_ids``), ``responses`` and ``full_position_ids`` -> a DataBatch in the
    post-generation layout of docs/DATA_LAYOUT.md (prompts left-padded, responses right-padded)."""
    if not items:
        raise ValueError("collate_sequences got no items")
    n = len(items)
    p_width = max(int(it["input_ids"].shape[0]) for it in items)
    r_width = max(int(it["responses"].shape[0]) for it in items)
    lead = tuple(items[0]["full_position_ids"].shape[:-1])
    prompts = torch.full((n, p_width), pad_token_id, dtype=torch.long)
    responses = torch.full((n, r_width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p_width), dtype=torch.long)
    response_mask = torch.zeros((n, r_width), dtype=torch.long)
    position_ids = torch.zeros((n, *lead, p_width + r_width), dtype=torch.long)
    for i, it in enumerate(items):
        p, r = int(it["input_ids"].shape[0]), int(it["responses"].shape[0])
        prompts[i, p_width - p:] = it["input_ids"]
        prompt_mask[i, p_width - p:] = 1
        responses[i, :r] = it["responses"]
        response_mask[i, :r] = 1
        position_ids[i, ..., p_width - p:p_width] = it["full_position_ids"][..., :p]
        position_ids[i, ..., p_width:p_width + r] = it["full_position_ids"][..., p:]
    non_tensors = {key: [it.get(key) for it in items]
                   for key in ("multi_modal_inputs", "raw_prompt", "ground_truth", "images", "index", "uid")}
    return DataBatch(tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                              "attention_mask": torch.cat([prompt_mask, response_mask], 1),
                              "position_ids": position_ids, "response_mask": response_mask},
                     non_tensors=non_tensors)


def pad_sequences(batch: DataBatch, prompt_width: int, response_width: int, pad_token_id: int = 0,
                  response_keys: Sequence[str] = ()) -> DataBatch:
    """Widen a post-generation batch to `prompt_width` + `response_width` (left-pad prompts, right-pad
    responses). `response_keys`: other (B, R) tensors to right-pad with zeros (log-probs, advantages, ...)."""
    p0, r0 = batch.tensors["prompts"].shape[1], batch.tensors["responses"].shape[1]
    dp, dr = prompt_width - p0, response_width - r0
    if dp < 0 or dr < 0:
        raise ValueError(f"cannot narrow a batch from ({p0}, {r0}) to ({prompt_width}, {response_width})")
    if dp == 0 and dr == 0:
        return batch
    f = torch.nn.functional
    t = dict(batch.tensors)
    t["prompts"] = f.pad(t["prompts"], (dp, 0), value=pad_token_id)
    t["responses"] = f.pad(t["responses"], (0, dr), value=pad_token_id)
    t["response_mask"] = f.pad(t["response_mask"], (0, dr), value=0)
    for key in ("input_ids", "attention_mask", "position_ids"):
        value = t[key]
        fill = pad_token_id if key == "input_ids" else 0
        t[key] = torch.cat([f.pad(value[..., :p0], (dp, 0), value=fill), f.pad(value[..., p0:], (0, dr), value=fill)],
                           dim=-1)
    for key in response_keys:
        if key in t:
            t[key] = f.pad(t[key], (0, dr), value=0)
    return DataBatch(t, dict(batch.non_tensors), dict(batch.meta))


# ============================================================================= builders


def build_sft_dataset(data_files: str, config: Any, tokenizer: Any, processor: Any = None,
                      model_config: Any = None) -> SFTDataset:
    dataset = SFTDataset.from_config(data_files, config, tokenizer, processor, model_config)
    return dataset


def build_preference_dataset(data_files: str, config: Any, tokenizer: Any, processor: Any = None,
                             model_config: Any = None, margin_key: str = "margin") -> PreferenceDataset:
    return PreferenceDataset.from_config(data_files, config, tokenizer, processor, model_config, margin_key=margin_key)
