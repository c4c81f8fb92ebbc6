"""LoRA / QLoRA: merged weights equal peft's own merge, the adapter can be switched off (the reference
policy), QLoRA refuses to start on CPU (fast); a LoRA training run through the CLI whose reference is the
base model, whose rollout gets merged weights, and whose checkpoint exports both ways (slow)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from mtrl.models import lora
from mtrl.utils.errors import UserError
from mtrl.config.worker import ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tiny_vl(tmp_path_factory):
    from mtrl.models.tiny import ensure_tiny_model

    return ensure_tiny_model(str(tmp_path_factory.getbasetemp() / "tiny_qwen2_vl_lora"), arch="qwen2_vl")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_vl(tmp_path_factory)


def lora_model_config(**kw):
    return ModelConfig(peft_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                       lora_target_modules=["q_proj", "v_proj", "o_proj"], **kw)


def randomize_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_merged_state_dict_equals_peft_merge_and_keeps_base_names(tiny_path):
    from mtrl.models.loader import load_model

    base_names = set(load_model(tiny_path).state_dict())
    model = lora.apply_lora(load_model(tiny_path), lora_model_config())
    assert lora.is_peft_model(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    randomize_adapter(model)
    merged = lora.merge_lora_state_dict(model.state_dict(), lora.lora_scaling({"r": 4, "lora_alpha": 8}))
    assert set(merged) == base_names
    reference = model.merge_and_unload().state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=key)


def test_adapter_switch_gives_the_base_policy(tiny_path):
    from mtrl.models.loader import load_model

    base = load_model(tiny_path)
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = lora.apply_lora(load_model(tiny_path), lora_model_config())
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # B = 0 at start: same policy
        randomize_adapter(model)
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)
        with model.disable_adapter():  # what compute_ref_log_probs uses
            torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_rollout_weights_and_adapter_names(tiny_path):
    from mtrl.models.loader import load_model
    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    cfg = lora_model_config()
    model = lora.apply_lora(load_model(tiny_path), cfg)
    randomize_adapter(model, seed=3)
    weights = dict(RolloutWeightSync(model, cfg).weights())
    rollout = load_model(tiny_path)  # what the rollout engine holds: the plain model
    missing, unexpected = rollout.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    merged = model.merge_and_unload().state_dict()  # peft's own merge
    assert all(torch.allclose(weights[k], merged[k], atol=1e-6) for k in weights)
    # QLoRA path: only adapter weights gathered, merged into the base read from disk (once).
    qcfg = lora_model_config()
    qcfg.peft_type = "qlora"
    model = lora.apply_lora(load_model(tiny_path), cfg)
    randomize_adapter(model, seed=3)
    loads = []
    sync = RolloutWeightSync(model, qcfg, load_base=lambda: loads.append(1) or load_model(tiny_path))
    for _ in range(2):
        q = dict(sync.weights())
        assert q.keys() == weights.keys() and all(torch.allclose(q[k], weights[k], atol=1e-6) for k in q)
    assert len(loads) == 1
    plain = dict(RolloutWeightSync(model, ModelConfig()).weights())
    assert any("lora_A" in k for k in plain)
    names = lora.adapter_state_dict(model.state_dict())
    assert names and all(k.startswith("base_model.model.") and ".default." not in k for k in names)


def test_adapter_sync_sends_peft_named_factors_and_the_unmerged_base(tiny_path):
    """worker.rollout.lora_sync=adapter: the factors under the names peft saves, the base weights as loaded."""
    from peft import get_peft_model_state_dict

    from mtrl.models.loader import load_model
    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    cfg = lora_model_config()
    model = lora.apply_lora(load_model(tiny_path), cfg)
    randomize_adapter(model, seed=3)
    sync = RolloutWeightSync(model, cfg, lora_sync="adapter")
    assert sync.sends_adapter and sync.adapter_config == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"], "bias": "none"}
    factors = sync.adapter_weights(torch.bfloat16)
    saved = get_peft_model_state_dict(model)  # what peft's save_pretrained writes
    assert sorted(factors) == sorted(saved) and len(factors) == 2 * 3 * model.config.text_config.num_hidden_layers
    assert all(factors[k].dtype == torch.bfloat16 and torch.equal(factors[k], saved[k].bfloat16()) for k in saved)
    base = dict(sync.weights(merge_lora=False))
    plain = load_model(tiny_path).state_dict()
    assert base.keys() <= plain.keys() and all(torch.equal(base[k], plain[k]) for k in base)
    assert not RolloutWeightSync(model, cfg).sends_adapter  # lora_sync=merged (the default)


def test_adapter_sync_of_a_vision_tower_adapter_stops_at_start(tiny_path):
    from mtrl.models.loader import load_model
    from mtrl.workers.rollout.weight_sync import RolloutWeightSync

    cfg = lora_model_config()
    cfg.lora_target_modules = ["q_proj", "qkv"]  # qkv: the attention of Qwen2-VL's vision blocks
    model = lora.apply_lora(load_model(tiny_path), cfg)
    with pytest.raises(UserError, match=r"lora_sync=adapter: the LoRA adapter covers 2 vision-tower modules "
                                        r"\(model.visual.blocks.0.attn.qkv, ...\) and vLLM's LoRA serves "
                                        r"language-model modules only; use worker.rollout.lora_sync=merged"):
        RolloutWeightSync(model, cfg, lora_sync="adapter")
    RolloutWeightSync(model, cfg)  # merged: the vision tower's adapter is merged like any other


def test_qlora_on_cpu_stops_at_start_with_a_clear_message():
    cfg = ModelConfig(peft_type="qlora")
    with pytest.raises(UserError, match=r"qlora .*needs a CUDA GPU.*Use peft_type=lora on CPU"):
        lora.check_peft_supported(cfg, "cpu")
    lora.check_peft_supported(ModelConfig(peft_type="lora"), "cpu")
    lora.check_peft_supported(ModelConfig(), "cpu")
    with pytest.raises(UserError, match="lora_target_modules is empty"):
        lora.check_peft_supported(ModelConfig(peft_type="lora", lora_target_modules=[]), "cpu")
    with pytest.raises(UserError, match="lora_target_modules"):
        lora.apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), ModelConfig(peft_type="lora",
                                                                             lora_target_modules=["nope"]))


# ============================================================================= end to end (slow)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_e2e")


@pytest.fixture(scope="module")
def lora_run(workdir):
    from test_checkpoint import run_cli

    proc, rows = run_cli(workdir, "lora", "worker.actor.model.peft_type=lora", "worker.actor.model.lora_rank=4",
                         "worker.actor.optim.lr=1e-2", "optimization.disable_divergence=false",
                         "optimization.divergence_penalty=kl", steps=2)
    return SimpleNamespace(dir=workdir / "runs" / "lora", rows=rows, proc=proc)


@pytest.mark.slow
def test_lora_run_uses_the_base_model_as_reference(lora_run):
    rows = {r["step"]: r for r in lora_run.rows}
    # Step 1: the adapter starts at B = 0, so the policy is the base model: zero divergence to the reference.
    assert rows[1]["actor/reward_divergence"] == pytest.approx(0.0, abs=1e-7)
    # Step 2: the adapter has trained; the reference (adapter disabled) has not.
    assert rows[2]["actor/reward_divergence"] > 1e-7
    assert rows[1]["actor/grad_norm"] > 0
    checkpoint = lora_run.dir / "global_step_2"
    meta = json.loads((checkpoint / "mtrl_checkpoint.json").read_text())
    assert meta["actor"]["peft_type"] == "lora" and meta["actor"]["lora"]["rank"] == 4
    adapter_config = json.loads((checkpoint / "actor" / "huggingface" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.slow
def test_lora_checkpoint_exports_merged_and_as_adapter(lora_run, workdir):
    import transformers
    from peft import PeftModel

    from mtrl.models.export import main as export_main
    from mtrl.models.loader import load_model
    from mtrl.utils.checkpoint import load_model_state_dict

    checkpoint = lora_run.dir / "global_step_2"
    assert export_main(["--checkpoint-dir", str(checkpoint)]) == 0
    assert export_main(["--checkpoint-dir", str(checkpoint), "--no-merge-lora"]) == 0
    merged_dir, adapter_dir = checkpoint / "hf_model", checkpoint / "hf_adapter"
    assert (merged_dir / "model.safetensors").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    base_path = json.loads((checkpoint / "mtrl_checkpoint.json").read_text())["actor"]["model_path"]
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == base_path

    # The trained actor: the base model with the checkpoint's adapter, as the workers held it.
    actor = lora.apply_lora(load_model(base_path), ModelConfig(peft_type="lora", lora_rank=4, lora_alpha=16))
    actor.load_state_dict(load_model_state_dict(str(checkpoint / "actor")), strict=True)
    actor.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(["What colour is the circle? Answer with one word.", "red"], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        expected = actor(**ids).logits
        with actor.disable_adapter():
            base_logits = actor(**ids).logits
        merged = transformers.AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
        got_merged = merged(**ids).logits
        adapted = PeftModel.from_pretrained(
            transformers.AutoModelForImageTextToText.from_pretrained(base_path), adapter_dir).eval()
        got_adapter = adapted(**ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changed the policy
    torch.testing.assert_close(got_merged, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_adapter, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_qlora_run_fails_at_start_on_cpu(workdir):
    from test_checkpoint import run_cli

    proc, _ = run_cli(workdir, "qlora", "worker.actor.model.peft_type=qlora", steps=1, expect_rc=2)
    assert "qlora" in proc.stderr and "needs a CUDA GPU" in proc.stderr
    assert not os.path.exists(workdir / "runs" / "qlora" / "global_step_1")
