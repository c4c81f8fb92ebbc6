"""`python -m mtrl.models.export`: checkpoints -> Hugging Face folders that transformers / peft load offline,
with the weights (and logits) of the checkpoint; run folders, skipping, crash safety, LoRA both ways (fast,
from checkpoints written in-process); the export of a real training run, in a process without Ray (slow)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mtrl.models import lora
from mtrl.models.export import export, main
from mtrl.utils import checkpoint as ckpt
from mtrl.config.worker import ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from mtrl.models.tiny import ensure_tiny_model

    return ensure_tiny_model(str(tmp_path_factory.getbasetemp() / "tiny_qwen2_vl_export"), arch="qwen2_vl")


def trained_model(path, seed, peft=None):
    """The tiny model with every weight moved (as training would), optionally with a LoRA adapter."""
    from mtrl.models.loader import load_model

    model = load_model(path)
    if peft:
        model = lora.apply_lora(model, peft)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if peft is None or "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def write_checkpoint(run_dir, step, model, model_path, peft_type=None):
    """A checkpoint as the workers + controller write it (one rank, in this process)."""
    from mtrl.models.loader import load_processor

    tokenizer, processor = load_processor(model_path)
    final = os.path.join(run_dir, ckpt.step_dir_name(step))
    artifacts = [model.config, model.generation_config, processor or tokenizer]  # as the actor worker does
    if peft_type:
        artifacts.append(model.peft_config["default"])
    ckpt.save_fsdp_state(os.path.join(final, "actor"), model, hf_artifacts=artifacts)
    meta = {"format": 1, "global_step": step, "world_size": 1, "roles": ["actor"],
            "actor": {"model_path": model_path, "peft_type": peft_type, "frozen_params_saved": True}}
    with open(os.path.join(final, ckpt.META_FILE), "w") as f:
        json.dump(meta, f)
    return final


def text_inputs(folder):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return tokenizer(["What colour is the triangle? Answer with one word.", "two"], return_tensors="pt",
                     padding=True)


def load_exported(folder):
    import transformers

    return transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()


def test_full_export_loads_with_transformers_and_gives_the_same_logits(tmp_path, tiny_path):
    import transformers

    model = trained_model(tiny_path, seed=1)
    checkpoint = write_checkpoint(str(tmp_path / "run"), 5, model, tiny_path)
    assert export(checkpoint) == [os.path.join(checkpoint, "hf_model")]
    out = os.path.join(checkpoint, "hf_model")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json", "mtrl_export.json"} <= set(os.listdir(out))
    exported = load_exported(out)
    expected = model.state_dict()
    got = exported.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # vision tower included
    inputs = text_inputs(out)
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.tokenizer.chat_template
    assert json.load(open(os.path.join(out, "mtrl_export.json")))["global_step"] == 5
    # A lower-precision copy on request.
    half = export(checkpoint, out=str(tmp_path / "bf16"), dtype="bf16")[0]
    assert load_exported(half).model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.load(open(os.path.join(half, "config.json")))["dtype"] == "bfloat16"


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen2"])
def test_every_architecture_round_trips(tmp_path, arch):
    import transformers

    from mtrl.models.tiny import ensure_tiny_model

    path = ensure_tiny_model(str(tmp_path / arch), arch=arch)
    model = trained_model(path, seed=2)
    checkpoint = write_checkpoint(str(tmp_path / "run"), 1, model, path)
    out = export(checkpoint)[0]
    cls = transformers.AutoModelForCausalLM if arch == "qwen2" else transformers.AutoModelForImageTextToText
    exported = cls.from_pretrained(out).eval()
    got, expected = exported.state_dict(), model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    inputs = text_inputs(out)
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_run_folder_exports_each_checkpoint_once(tmp_path, tiny_path, capsys):
    run = str(tmp_path / "run")
    for step in (2, 4):
        write_checkpoint(run, step, trained_model(tiny_path, seed=step), tiny_path)
    # Leftovers of crashes: an unfinished checkpoint and an unfinished export are not taken for finished ones.
    os.makedirs(os.path.join(run, "global_step_6.partial", "actor"))
    os.makedirs(os.path.join(run, "global_step_8", "actor"))
    os.makedirs(str(tmp_path / "out" / "global_step_4.partial"))
    assert main(["--checkpoint-dir", run, "--out", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["global_step_2", "global_step_4"]
    assert main(["--checkpoint-dir", run, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("already exported, skipped") == 2
    write_checkpoint(run, 10, trained_model(tiny_path, seed=10), tiny_path)
    assert export(run, out=str(tmp_path / "out")) == [str(tmp_path / "out" / "global_step_10")]
    # Default outputs live inside each checkpoint.
    assert len(export(run)) == 3 and all(os.path.isdir(os.path.join(run, f"global_step_{s}", "hf_model"))
                                         for s in (2, 4, 10))


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["--checkpoint-dir", str(tmp_path / "missing")]) == 2
    os.makedirs(tmp_path / "empty")
    assert main(["--checkpoint-dir", str(tmp_path / "empty")]) == 2
    os.makedirs(tmp_path / "global_step_3" / "actor")
    assert main(["--checkpoint-dir", str(tmp_path / "global_step_3")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "holds no MTRL checkpoint" in err and "incomplete checkpoint" in err


def test_lora_export_merged_and_as_peft_adapter(tmp_path, tiny_path):
    from peft import PeftModel

    cfg = ModelConfig(peft_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                      lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = trained_model(tiny_path, seed=3, peft=cfg)
    checkpoint = write_checkpoint(str(tmp_path / "run"), 1, model, tiny_path, peft_type="lora")
    merged_dir = export(checkpoint)[0]
    adapter_dir = export(checkpoint, merge_lora=False)[0]
    assert os.path.basename(merged_dir) == "hf_model" and os.path.basename(adapter_dir) == "hf_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(adapter_dir))
    assert not os.path.exists(os.path.join(adapter_dir, "model.safetensors"))
    inputs = text_inputs(merged_dir)
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            assert (model(**inputs).logits - expected).abs().max() > 1e-3
        torch.testing.assert_close(load_exported(merged_dir)(**inputs).logits, expected, atol=1e-5, rtol=0)
        adapted = PeftModel.from_pretrained(load_exported(tiny_path), adapter_dir).eval()
        torch.testing.assert_close(adapted(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_export_runs_without_ray_or_a_process_group(tmp_path, tiny_path):
    checkpoint = write_checkpoint(str(tmp_path / "run"), 1, trained_model(tiny_path, seed=0), tiny_path)
    code = ("import sys, torch.distributed as dist; from mtrl.models.export import main; "
            f"rc = main(['--checkpoint-dir', {checkpoint!r}]); "
            "assert 'ray' not in sys.modules and not dist.is_initialized(); sys.exit(rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(checkpoint, "hf_model", "model.safetensors"))


# ============================================================================= a real run (slow)


@pytest.mark.slow
def test_export_of_a_trained_run_gives_the_actors_logits(tmp_path_factory):
    import transformers

    from mtrl.models.loader import load_model
    from test_checkpoint import cli_env, run_cli

    workdir = tmp_path_factory.mktemp("export_e2e")
    run_cli(workdir, "run", "training.save_freq=1", steps=2)
    run = workdir / "runs" / "run"
    proc = subprocess.run([sys.executable, "-m", "mtrl.models.export", "--checkpoint-dir", str(run),
                           "--out", str(workdir / "exports")], env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(workdir / "exports")) == ["global_step_1", "global_step_2"]
    out = workdir / "exports" / "global_step_2"

    # The trained actor: the full state dict gathered from the (2-worker, sharded) checkpoint.
    base_path = ckpt.read_meta(str(run / "global_step_2"))["actor"]["model_path"]
    actor = load_model(base_path).eval()
    base = {k: v.clone() for k, v in actor.state_dict().items()}
    actor.load_state_dict(ckpt.load_model_state_dict(str(run / "global_step_2" / "actor")), strict=True)
    assert any(not torch.equal(base[k], v) for k, v in actor.state_dict().items())  # training moved it

    exported = transformers.AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(out, local_files_only=True)
    from PIL import Image

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, actor(**inputs).logits, atol=1e-5, rtol=0)
