"""Padding-free (packed, varlen-attention) forwards give the same numbers as padded forwards.

The reference everywhere is an untouched copy of the model on transformers' own ``sdpa`` attention,
run on the padded batch, with log-softmax computed here in the test. Tiny random models, fp32, CPU.
"""

import copy

import pytest
import torch

from mtrl.models.attention import (
    VARLEN_ATTENTION,
    cu_seqlens_from_position_ids,
    enable_padding_free_attention,
    flash_attn_available,
    padding_free_attention_enabled,
)
from mtrl.models.packing import forward_micro_batch, pack_padded, unpack
from mtrl.models.tiny import build_tiny_model
from mtrl.utils.rope import compute_position_ids

ATOL = 1e-5
TEXT_TOKENS = (10, 500)  # ordinary (non-special) token ids of the tiny bpe vocabulary


# ----------------------------------------------------------------------------------------------
# Tiny models (mtrl.models.tiny writes real Hugging Face folders; built once per test module)
# ----------------------------------------------------------------------------------------------
class TinyModels:
    def __init__(self, tmp_path_factory):
        self._factory, self._folders = tmp_path_factory, {}

    def folder(self, arch: str) -> str:
        if arch not in self._folders:
            self._folders[arch] = build_tiny_model(arch, self._factory.mktemp(arch) / "model")
        return self._folders[arch]

    def pair(self, arch: str, value_head: bool = False):
        """(reference model on sdpa, the same weights switched to varlen attention)."""
        ref = load_model(self.folder(arch), arch, value_head)
        model = copy.deepcopy(ref)
        enable_padding_free_attention(model, backend="torch")
        return ref, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyModels(tmp_path_factory)


def load_model(folder: str, arch: str, value_head: bool = False) -> torch.nn.Module:
    import transformers as tf

    if value_head and arch == "qwen2":  # verl-style critic: a token-classification head with one label
        return tf.AutoModelForTokenClassification.from_pretrained(folder, num_labels=1).eval()
    if value_head:  # VL critic: mtrl's backbone + linear value head
        from mtrl.models.loader import load_model as mtrl_load_model

        return mtrl_load_model(folder, for_value=True).eval()
    if arch == "qwen2":
        return tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    return tf.AutoModelForImageTextToText.from_pretrained(folder).eval()


def special_ids(config) -> dict:
    return {"pad": config.pad_token_id, "image": getattr(config, "image_token_id", None),
            "video": getattr(config, "video_token_id", None),
            "start": getattr(config, "vision_start_token_id", None),
            "end": getattr(config, "vision_end_token_id", None)}


# ----------------------------------------------------------------------------------------------
# Batches in the DATA_LAYOUT format
# ----------------------------------------------------------------------------------------------
def image(config, grid_t: int, grid_h: int, grid_w: int, seed: int) -> dict:
    patch = config.vision_config.patch_size
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(grid_t * grid_h * grid_w, 3 * 2 * patch * patch, generator=g),
            "image_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]])}


def video(config, grid_t: int, grid_h: int, grid_w: int, seed: int) -> dict:
    patch = config.vision_config.patch_size
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values_videos": torch.randn(grid_t * grid_h * grid_w, 3 * 2 * patch * patch, generator=g),
            "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]])}


def vision_tokens(mm: dict, ids: dict) -> list:
    """Placeholder tokens of one sample's vision inputs (merge size 2 -> 4 patches per token)."""
    toks = []
    for key, tok in (("image_grid_thw", ids["image"]), ("video_grid_thw", ids["video"])):
        for t, h, w in mm.get(key, torch.zeros(0, 3)).tolist():
            toks += [ids["start"]] + [tok] * int(t * h * w // 4) + [ids["end"]]
    return toks


def make_batch(config, rows, prompt_len: int, response_len: int, seed: int = 0):
    """rows: list of (n_prompt_text_tokens, n_response_tokens, mm_dict). Returns (tensors, mm_list)."""
    ids = special_ids(config)
    g = torch.Generator().manual_seed(seed)
    B, L = len(rows), prompt_len + response_len
    input_ids = torch.full((B, L), ids["pad"], dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for i, (n_prompt, n_resp, mm) in enumerate(rows):
        text = torch.randint(*TEXT_TOKENS, (n_prompt,), generator=g).tolist()
        prompt = text[:1] + vision_tokens(mm, ids) + text[1:]
        assert len(prompt) <= prompt_len and n_resp <= response_len
        input_ids[i, prompt_len - len(prompt):prompt_len] = torch.tensor(prompt)
        input_ids[i, prompt_len:prompt_len + n_resp] = torch.randint(*TEXT_TOKENS, (n_resp,), generator=g)
        attention_mask[i, prompt_len - len(prompt):prompt_len + n_resp] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, [mm for *_, mm in rows]


def token_types(config, input_ids):
    ids = special_ids(config)
    return (input_ids == ids["image"]).long() + 2 * (input_ids == ids["video"]).long()


def add_position_ids(model, tensors, mm_list):
    """Position ids in the batch layout via mtrl.utils.rope: (B, L) text, (B, 3, L) mRoPE (0 at padding)."""
    ids, am = tensors["input_ids"], tensors["attention_mask"].bool()
    rows = []
    for i, mm in enumerate(mm_list):
        row_ids = ids[i][am[i]]
        pos = compute_position_ids(model.config, row_ids, mm.get("image_grid_thw"), mm.get("video_grid_thw"),
                                   mm.get("second_per_grid_ts"))
        full = torch.zeros(*pos.shape[:-1], ids.shape[1], dtype=torch.long)
        full[..., am[i]] = pos
        rows.append(full)
    tensors["position_ids"] = torch.stack(rows)
    return tensors


def reference_logits(ref, tensors, mm_list):
    """Full padded logits (B, L, V) from the untouched sdpa model."""
    kwargs = {}
    for m in mm_list:
        for k, v in m.items():
            kwargs.setdefault(k, []).append(v)
    kwargs = {k: torch.cat(v) for k, v in kwargs.items()}
    pos = tensors["position_ids"]
    if getattr(ref.config, "vision_config", None) is not None:
        kwargs["mm_token_type_ids"] = token_types(ref.config, tensors["input_ids"])
        pos = pos.transpose(0, 1)
    return ref(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], position_ids=pos,
               use_cache=False, **kwargs).logits


def reference_outputs(ref, tensors, mm_list, R, temperature=1.0):
    logits = reference_logits(ref, tensors, mm_list)[:, -R - 1:-1].float() / temperature
    mask = tensors["attention_mask"][:, -R:].float()
    logp = torch.log_softmax(logits, -1)
    log_probs = logp.gather(-1, tensors["input_ids"][:, -R:, None])[..., 0] * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    return log_probs, entropy, logits * mask[..., None]


TEXT_ROWS = [(5, 6, {}), (9, 2, {}), (3, 8, {}), (7, 1, {})]


# ----------------------------------------------------------------------------------------------
# Packing helpers
# ----------------------------------------------------------------------------------------------
def test_pack_unpack_round_trip_and_position_layouts(text_pair):
    tensors, _ = make_batch(text_pair[0].config, TEXT_ROWS, prompt_len=9, response_len=8)
    ids, am = tensors["input_ids"], tensors["attention_mask"]
    pos2 = (am.cumsum(-1) - 1).clamp(min=0)
    packed = pack_padded(ids, am, pos2)
    lens = am.sum(-1)
    assert packed.input_ids.shape == (1, int(lens.sum()))
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0] + lens.cumsum(0).tolist()
    assert packed.max_seqlen == int(lens.max())
    assert packed.position_ids.shape == (1, packed.total_tokens)
    assert torch.equal(cu_seqlens_from_position_ids(packed.position_ids), packed.cu_seqlens)
    assert torch.equal(packed.unpack(packed.input_ids), ids * am)
    assert torch.equal(unpack(packed.input_ids[0], packed.indices, *ids.shape), ids * am)
    # (B, D, L) batch layout -> (D, 1, T) model layout, each row = that dimension's packed ids.
    pos3 = torch.stack([pos2, pos2 * 10, pos2 * 100], dim=1)
    packed3 = pack_padded(ids, am, pos3)
    assert packed3.position_ids.shape == (3, 1, packed.total_tokens)
    for d, scale in enumerate((1, 10, 100)):
        assert torch.equal(packed3.position_ids[d], packed.position_ids * scale)
    # Optional leading text row (0..n-1 per sequence) for mRoPE models -> (4, 1, T).
    packed4 = pack_padded(ids, am, pos3 * 7, add_text_position_row=True)
    assert packed4.position_ids.shape == (4, 1, packed.total_tokens)
    assert torch.equal(packed4.position_ids[0], packed.position_ids)
    assert torch.equal(packed4.position_ids[1:], packed3.position_ids * 7)
    # Trailing feature dims and gradients survive unpacking.
    feats = torch.randn(1, packed.total_tokens, 5, requires_grad=True)
    out = packed.unpack(feats)
    assert out.shape == (*ids.shape, 5) and torch.all(out[am == 0] == 0)
    out.sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))


# ----------------------------------------------------------------------------------------------
# Text model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_pair(tiny):
    return tiny.pair("qwen2")


def test_attention_switch(text_pair):
    ref, model = text_pair
    assert model.config._attn_implementation == VARLEN_ATTENTION + "_torch"
    assert padding_free_attention_enabled(model) and not padding_free_attention_enabled(ref)


@pytest.mark.parametrize("padding_free", [True, False])
def test_text_log_probs_entropy_logits_match_reference(text_pair, padding_free):
    ref, model = text_pair
    R = 8
    tensors, mm = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=R)
    add_position_ids(ref, tensors, mm)
    with torch.no_grad():
        exp_lp, exp_ent, exp_logits = reference_outputs(ref, tensors, mm, R, temperature=0.7)
        out = forward_micro_batch(model, tensors, None, R, temperature=0.7, padding_free=padding_free,
                                  return_entropy=True, return_logits=True)
    assert out["log_probs"].dtype == torch.float32 and out["log_probs"].shape == (4, R)
    torch.testing.assert_close(out["log_probs"], exp_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["entropy"], exp_ent, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["logits"], exp_logits, atol=ATOL, rtol=0)
    assert torch.all(out["log_probs"][tensors["attention_mask"][:, -R:] == 0] == 0)


def test_packed_sequences_do_not_see_each_other(text_pair):
    """Changing row 0's tokens must not change row 1's log-probs (no attention across segments)."""
    _, model = text_pair
    R = 8
    tensors, _ = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=R)
    with torch.no_grad():
        before = forward_micro_batch(model, tensors, None, R)["log_probs"]
        changed = dict(tensors, input_ids=tensors["input_ids"].clone())
        changed["input_ids"][0, -R - 3:] = (changed["input_ids"][0, -R - 3:] + 7) % 400 + 10
        after = forward_micro_batch(model, changed, None, R)["log_probs"]
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:], atol=0, rtol=0)


def test_position_ids_default_when_absent(text_pair):
    ref, model = text_pair
    R = 8
    tensors, mm = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=R)
    with torch.no_grad():
        no_pos = forward_micro_batch(model, tensors, None, R)["log_probs"]
        exp, _, _ = reference_outputs(ref, add_position_ids(ref, dict(tensors), mm), mm, R)
    torch.testing.assert_close(no_pos, exp, atol=ATOL, rtol=0)


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_text_gradients_match_padded_path(text_pair):
    _, model = text_pair
    R = 8
    tensors, mm = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=R)
    add_position_ids(model, tensors, mm)
    weights = torch.randn(4, R, generator=torch.Generator().manual_seed(1))
    grads = {}
    for padding_free in (True, False):
        model.zero_grad(set_to_none=True)
        out = forward_micro_batch(model, tensors, None, R, temperature=0.9, padding_free=padding_free,
                                  return_entropy=True, entropy_grad=True)
        ((out["log_probs"] * weights).sum() + 0.1 * out["entropy"].sum()).backward()
        grads[padding_free] = _param_grads(model)
    model.zero_grad(set_to_none=True)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 5
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_vl"])
def test_value_head_matches_padded_and_reference(tiny, arch):
    ref, model = tiny.pair(arch, value_head=True)
    R = 8
    rows = TEXT_ROWS if arch == "qwen2" else vl_rows(ref.config)
    tensors, mm = make_batch(model.config, rows, prompt_len=15, response_len=R)
    add_position_ids(ref, tensors, mm)
    mm_arg = None if arch == "qwen2" else mm
    with torch.no_grad():
        full = reference_logits(ref, tensors, mm)[..., 0]  # the critic's (B, L, 1) output
        expected = full[:, -R - 1:-1] * tensors["attention_mask"][:, -R:]
        for padding_free in (True, False):
            out = forward_micro_batch(model, tensors, mm_arg, R, padding_free=padding_free, value_head=True)
            assert set(out) == {"values"} and out["values"].shape == (len(rows), R)
            torch.testing.assert_close(out["values"], expected, atol=ATOL, rtol=0)


def test_generate_still_works_after_switch(text_pair):
    """The hybrid engine generates with the same model object: padded + KV-cache calls fall back to sdpa."""
    ref, model = text_pair
    tensors, _ = make_batch(model.config, [(4, 0, {}), (7, 0, {})], prompt_len=7, response_len=1)
    ids, am = tensors["input_ids"][:, :7], tensors["attention_mask"][:, :7]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        torch.testing.assert_close(model.generate(input_ids=ids, attention_mask=am, **kw),
                                   ref.generate(input_ids=ids, attention_mask=am, **kw), atol=0, rtol=0)


def test_entropy_has_no_graph_unless_asked(text_pair):
    _, model = text_pair
    tensors, _ = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=8)
    out = forward_micro_batch(model, tensors, None, 8, return_entropy=True)
    assert out["log_probs"].requires_grad and not out["entropy"].requires_grad
    out = forward_micro_batch(model, tensors, None, 8, return_entropy=True, entropy_grad=True)
    assert out["entropy"].requires_grad


def test_gradient_checkpointing_padding_free(text_pair):
    """Recomputation in backward still sees the segment boundaries (they travel as forward kwargs)."""
    _, model = text_pair
    R = 8
    tensors, mm = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=R)
    model.zero_grad(set_to_none=True)
    forward_micro_batch(model, tensors, None, R)["log_probs"].sum().backward()
    expected = _param_grads(model)
    model.activation_checkpointing_enable({"use_reentrant": False})
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        forward_micro_batch(model, tensors, None, R)["log_probs"].sum().backward()
        got = _param_grads(model)
    finally:
        model.activation_checkpointing_disable()
        model.eval()
        model.zero_grad(set_to_none=True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=name)


def test_padding_free_requires_switched_model(text_pair):
    ref, _ = text_pair
    tensors, _ = make_batch(ref.config, TEXT_ROWS, prompt_len=9, response_len=8)
    with pytest.raises(ValueError, match="enable_padding_free_attention"):
        forward_micro_batch(ref, tensors, None, 8, padding_free=True)
    assert forward_micro_batch(ref, tensors, None, 8, padding_free=False)["log_probs"].shape == (4, 8)


def test_varlen_attention_function_directly():
    """GQA, position-id-derived segments and bottom-right causal alignment for q_len < k_len."""
    from mtrl.models.attention import varlen_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    lens = [3, 6, 1, 4]
    T = sum(lens)
    q, k, v = torch.randn(1, 4, T, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=pos)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl].repeat_interleave(2, 1), v[:, :, sl].repeat_interleave(2, 1),
            is_causal=True, scale=0.3)
        torch.testing.assert_close(out[0, sl], ref[0].transpose(0, 1), atol=1e-6, rtol=0)
        start += n
    # 2 queries against 5 keys: the queries are the last two positions of the sequence.
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out, _ = varlen_attention_forward(module, q[:, :, :2], k[:, :, :5], v[:, :, :5], None,
                                      cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)
    full, _ = varlen_attention_forward(module, q[:, :, :5], k[:, :, :5], v[:, :, :5], None,
                                       cu_seq_lens_q=cu_k, cu_seq_lens_k=cu_k)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :2], k[:, :, :5].repeat_interleave(2, 1),
        v[:, :, :5].repeat_interleave(2, 1),
        attn_mask=torch.ones(2, 5, dtype=torch.bool).tril(3))
    torch.testing.assert_close(out[0], ref[0].transpose(0, 1), atol=1e-6, rtol=0)
    assert full.shape == (1, 5, 4, 8)


def test_length_buckets_bound_the_padding():
    """Longest first; a segment joins the bucket while n x longest <= 1.5 x real tokens; empty ones drop."""
    from mtrl.models.attention import _length_buckets

    # 10, 9, 8, 2 -> 4 x 10 = 40 <= 1.5 x 29; adding 1 would give 50 > 1.5 x 30 = 45.
    assert _length_buckets([10, 9, 2, 0, 8, 1]) == [[0, 1, 4, 2], [5]]
    assert _length_buckets([5, 5, 5]) == [[0, 1, 2]]
    assert _length_buckets([0, 0]) == []


def _per_segment_attention(q, k, v, cu_q, cu_k, scale):
    """Reference: one sdpa call per segment, bottom-right causal, GQA by repeating the kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    outs = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
        if q1 > q0:
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(k1 - k0 - (q1 - q0))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask, scale=scale))
    return torch.cat(outs, 2).transpose(1, 2)  # (1, T, H, D)


@pytest.mark.parametrize("same_segments", [True, False])
def test_bucketed_torch_kernel_matches_per_segment_attention(same_segments):
    """Long-tailed lengths (several buckets, an empty segment), GQA: outputs and q/k/v gradients agree."""
    from mtrl.models.attention import _length_buckets, _torch_varlen

    torch.manual_seed(0)
    lens_k = [3, 40, 1, 0, 17, 16, 2, 38]
    lens_q = lens_k if same_segments else [min(n, 2 + i % 3) for i, n in enumerate(lens_k)]  # q_len <= k_len
    assert len(_length_buckets(lens_q)) >= 2
    cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
    q = torch.randn(1, 4, sum(lens_q), 8, requires_grad=True)
    k, v = (torch.randn(1, 2, sum(lens_k), 8, requires_grad=True) for _ in range(2))
    weights = torch.randn(1, sum(lens_q), 4, 8)
    results = []
    for fn in (_torch_varlen, None):
        out = (fn(q, k, v, cu_q, cu_k, 0.3, 0.0, True, False) if fn is not None
               else _per_segment_attention(q, k, v, cu_q, cu_k, 0.3))
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=0)


def test_flash_kernel_call_layout(monkeypatch):
    """The flash path's tensor layout and arguments, checked on CPU with a stand-in for flash-attn."""
    from mtrl.models import attention

    calls = []

    def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        calls.append((q.shape, k.shape, cu_seqlens_q.dtype, max_seqlen_q, causal, dropout_p))
        out = attention._torch_varlen(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                      v.transpose(0, 1)[None].float(), cu_seqlens_q, cu_seqlens_k,
                                      softmax_scale, 0.0, causal, False)
        return out[0].to(q.dtype)  # (T, H, D)

    monkeypatch.setattr(attention, "_flash_attn_varlen_func", lambda: fake_flash_attn_varlen_func)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    expected = attention._torch_varlen(q, k, v, cu, cu, 0.25, 0.0, True, False)
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    out = attention._flash_varlen(q16, k16, v16, cu, cu, 5, 5, 0.25, 0.1, True, False, {})
    assert calls == [((9, 4, 8), (9, 2, 8), torch.int32, 5, True, 0.0)]
    assert out.shape == (1, 9, 4, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


def test_bad_response_layout_is_rejected(text_pair):
    _, model = text_pair
    tensors, _ = make_batch(model.config, TEXT_ROWS, prompt_len=9, response_len=8)
    tensors["attention_mask"][1, :9] = 0  # a row whose prompt is all padding
    with pytest.raises(ValueError, match="no real token before it"):
        forward_micro_batch(model, tensors, None, 8)


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_backend_missing_gives_install_hint(text_pair):
    model = copy.deepcopy(text_pair[0])
    with pytest.raises(ImportError, match=r"pip install flash-attn.*mtrl\[flash\]"):
        enable_padding_free_attention(model, backend="flash")


# ----------------------------------------------------------------------------------------------
# Qwen-VL models: images, a video, text-only rows mixed in one micro-batch
# ----------------------------------------------------------------------------------------------
def vl_rows(config):
    rows = [
        (4, 5, image(config, 1, 4, 4, seed=1)),     # 4 image tokens
        (6, 3, {}),                                  # text-only row between image rows
        (3, 7, image(config, 1, 4, 8, seed=2)),     # 8 image tokens, wide image
        (5, 2, {}),
    ]
    if config.model_type == "qwen2_vl":
        rows.append((3, 4, video(config, 2, 4, 4, seed=3)))  # 8 video tokens over two temporal patches
    return rows


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vl_log_probs_and_entropy_match_reference(tiny, arch):
    ref, model = tiny.pair(arch)
    assert model.config.vision_config._attn_implementation == "sdpa"  # vision tower untouched
    R = 7
    tensors, mm = make_batch(model.config, vl_rows(model.config), prompt_len=15, response_len=R, seed=3)
    add_position_ids(ref, tensors, mm)
    with torch.no_grad():
        exp_lp, exp_ent, _ = reference_outputs(ref, tensors, mm, R, temperature=1.3)
        for padding_free in (True, False):
            out = forward_micro_batch(model, tensors, mm, R, temperature=1.3, padding_free=padding_free,
                                      return_entropy=True)
            torch.testing.assert_close(out["log_probs"], exp_lp, atol=ATOL, rtol=0)
            torch.testing.assert_close(out["entropy"], exp_ent, atol=ATOL, rtol=0)
        # A micro-batch of only the text rows (no vision inputs at all) works too.
        text_rows = [i for i, m in enumerate(mm) if not m]
        sub = {k: v[text_rows] for k, v in tensors.items()}
        out = forward_micro_batch(model, sub, [mm[i] for i in text_rows], R, temperature=1.3)
        torch.testing.assert_close(out["log_probs"], exp_lp[text_rows], atol=ATOL, rtol=0)
        # The images matter (the test would be vacuous otherwise).
        blank = [dict(m, pixel_values=torch.zeros_like(m["pixel_values"])) if "pixel_values" in m else m
                 for m in mm]
        other = forward_micro_batch(model, tensors, blank, R)["log_probs"]
        assert not torch.allclose(other[0], exp_lp[0], atol=1e-4)  # row 0 has an image


def test_vl_four_row_position_ids(tiny):
    """(B, 4, L) position ids (text row first) are packed to (4, 1, T) and work too."""
    ref, model = tiny.pair("qwen2_vl")
    R = 7
    tensors, mm = make_batch(ref.config, vl_rows(ref.config), prompt_len=15, response_len=R, seed=3)
    add_position_ids(ref, tensors, mm)
    with torch.no_grad():
        expected, _, _ = reference_outputs(ref, tensors, mm, R)
        text_row = (tensors["attention_mask"].cumsum(-1) - 1).clamp(min=0)[:, None]
        tensors["position_ids"] = torch.cat([text_row, tensors["position_ids"]], dim=1)
        assert pack_padded(tensors["input_ids"], tensors["attention_mask"],
                           tensors["position_ids"]).position_ids.shape[:2] == (4, 1)
        out = forward_micro_batch(model, tensors, mm, R)["log_probs"]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_vl"])
def test_segments_from_position_ids_when_kwargs_are_lost(tiny, arch, monkeypatch):
    """A wrapper that drops the varlen kwargs still gets correct segments from the text positions."""
    from mtrl.models.packing import PackedInputs

    ref, model = tiny.pair(arch)
    R = 8
    rows = TEXT_ROWS if arch == "qwen2" else vl_rows(ref.config)
    tensors, mm = make_batch(ref.config, rows, prompt_len=15, response_len=R, seed=3)
    add_position_ids(ref, tensors, mm)
    monkeypatch.setattr(PackedInputs, "attention_kwargs", lambda self: {})
    with torch.no_grad():
        expected, _, _ = reference_outputs(ref, tensors, mm, R)
        out = forward_micro_batch(model, tensors, mm if arch != "qwen2" else None, R)["log_probs"]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_vl_loaded_with_varlen_attention_name(tiny):
    """from_pretrained(attn_implementation="mtrl_varlen") sets the vision tower to it too; still exact."""
    from transformers import AutoModelForImageTextToText

    from mtrl.models.attention import register_varlen_attention

    folder = tiny.folder("qwen2_vl")
    ref = load_model(folder, "qwen2_vl")
    register_varlen_attention()
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=VARLEN_ATTENTION).eval()
    assert model.config.vision_config._attn_implementation == VARLEN_ATTENTION
    R = 7
    tensors, mm = make_batch(ref.config, vl_rows(ref.config), prompt_len=15, response_len=R, seed=3)
    add_position_ids(ref, tensors, mm)
    with torch.no_grad():
        expected, _, _ = reference_outputs(ref, tensors, mm, R)
        torch.testing.assert_close(forward_micro_batch(model, tensors, mm, R)["log_probs"], expected,
                                   atol=ATOL, rtol=0)
        enable_padding_free_attention(model)  # moves the vision tower back to sdpa
        assert model.config.vision_config._attn_implementation == "sdpa"
        torch.testing.assert_close(forward_micro_batch(model, tensors, mm, R)["log_probs"], expected,
                                   atol=ATOL, rtol=0)


def test_vl_gradients_match_padded_path(tiny):
    """Gradients reach the vision tower and agree between packed and padded forwards."""
    _, model = tiny.pair("qwen2_5_vl")
    R = 7
    tensors, mm = make_batch(model.config, vl_rows(model.config), prompt_len=15, response_len=R, seed=3)
    add_position_ids(model, tensors, mm)
    weights = torch.randn(len(mm), R, generator=torch.Generator().manual_seed(2))
    grads = {}
    for padding_free in (True, False):
        model.zero_grad(set_to_none=True)
        out = forward_micro_batch(model, tensors, mm, R, padding_free=padding_free)
        (out["log_probs"] * weights).sum().backward()
        grads[padding_free] = _param_grads(model)
    model.zero_grad(set_to_none=True)
    assert any(name.startswith("model.visual.") for name in grads[True])
    assert grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=ATOL, rtol=0, msg=name)
