"""Checkpoints: layout, crash safety, save_limit, resume selection (fast, in-process); sharded state that
loads at another world size (torch.distributed on CPU, slow); and end-to-end resume through the CLI:
4 steps straight == 2 steps + resume for 2 (RL, DPO, reward model), resume on fewer workers, evaluation of a
checkpoint (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtrl.optimization.policy_optimization import AdaptiveDivergenceController, EntropyBonusController
from mtrl.training.checkpointing import CheckpointManager, resolve_resume_path, should_save
from mtrl.training.training_config import MTRLConfig
from mtrl.utils import checkpoint as ckpt
from mtrl.utils.errors import UserError
from mtrl.workers import fsdp_utils
from mtrl.config.worker import FSDPConfig, OptimConfig

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# A deterministic reward with a spread of values for a random tiny model (the shapes task's accuracy is ~0),
# so that advantages, losses and gradients are not all zero.
LENGTH_REWARD = '''
def reward_function(data_dict):
    n = len(str(data_dict.get("response") or ""))
    return (n % 5) / 4.0, {"length_mod": float(n % 5)}
'''
# Metrics that measure wall-clock time, not the computation.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TIMING_PREFIXES = ("timing/", "perf/tokens_per_second", "perf/samples_per_second", "perf/throughput",
                   "perf/step_seconds", "memory/")  # memory/: what the process holds, not what it computed


# ============================================================================= in-process (fast)


def tiny_text_model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def train_steps(model, optimizer, scheduler, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 61, (4, 6), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


class FakeGroup:
    """Stands in for a worker group: one in-process 'rank' that saves / loads through mtrl.utils.checkpoint."""

    def __init__(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def save_checkpoint(self, path):
        ckpt.save_fsdp_state(path, self.model, self.optimizer, self.scheduler, hf_artifacts=[self.model.config])
        return [None]

    def load_checkpoint(self, path):
        ckpt.load_fsdp_state(path, self.model, self.optimizer, self.scheduler)
        return [None]


class ControllerState:
    """The controller state a trainer's state_dict() holds: step, data position, divergence and entropy-bonus
    controllers, RNG (the real Trainer's is tested end to end below)."""

    def __init__(self):
        self.global_step, self.offset = 0, 0
        self.divergence = AdaptiveDivergenceController(0.1, 6.0, 100)
        self.entropy_bonus = EntropyBonusController("adaptive", 0.0, target=0.5, step=0.01)

    def state_dict(self):
        return {"global_step": self.global_step, "dataloader": {"epoch": 0, "offset": self.offset},
                "divergence": self.divergence.state_dict(), "entropy_bonus": self.entropy_bonus.state_dict(),
                "rng": ckpt.rng_state()}

    def load_state_dict(self, state):
        self.global_step, self.offset = state["global_step"], state["dataloader"]["offset"]
        self.divergence.load_state_dict(state["divergence"])
        self.entropy_bonus.load_state_dict(state["entropy_bonus"])
        ckpt.set_rng_state(state["rng"])


def fake_trainer(run_dir, save_limit=None, **training):
    """A checkpoint manager, one in-process worker group and the controller state, as a trainer holds them."""
    config = MTRLConfig()
    config.training.save_checkpoint_path = str(run_dir)
    config.training.save_limit = save_limit
    for key, value in training.items():
        setattr(config.training, key, value)
    model = tiny_text_model()
    optimizer = fsdp_utils.build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=3, lr_scheduler_type="cosine"))
    scheduler = fsdp_utils.build_lr_scheduler(optimizer, OptimConfig(warmup_steps=3, lr_scheduler_type="cosine"), 10)
    return SimpleNamespace(config=config, run_dir=str(run_dir), manager=CheckpointManager(config),
                           actor_wg=FakeGroup(model, optimizer, scheduler), controller=ControllerState())


def save(trainer):
    return trainer.manager.save(trainer.controller.global_step, {"actor": trainer.actor_wg},
                                trainer.controller.state_dict())


def resume(trainer):
    found = trainer.manager.load({"actor": trainer.actor_wg})
    if found is None:
        return None
    trainer.controller.load_state_dict(found[1])
    return found[0]


def test_save_resume_round_trip_layout_and_save_limit(tmp_path):
    trainer = fake_trainer(tmp_path / "run", save_limit=2)
    group = trainer.actor_wg
    for step in (1, 2, 3):
        train_steps(group.model, group.optimizer, group.scheduler, 1, seed=step)
        controller = trainer.controller
        controller.global_step = step
        controller.offset = 16 * step
        controller.divergence.update(10.0, 10)
        controller.entropy_bonus.coefficient(0.1)  # below target: the coefficient grows by one step
        path = save(trainer)
        assert ckpt.read_tracker(trainer.run_dir) == step
    assert os.path.basename(path) == "global_step_3"
    # save_limit=2 keeps the newest two; nothing half-written is left.
    assert sorted(os.listdir(trainer.run_dir)) == ["global_step_2", "global_step_3", ckpt.TRACKER_FILE]
    assert sorted(os.listdir(path)) == sorted(["actor", ckpt.META_FILE, ckpt.TRAINER_STATE_FILE, ckpt.TRAINER_RNG_FILE])
    assert sorted(os.listdir(os.path.join(path, "actor"))) == ["extra_state_rank_0.pt", "huggingface", "model", "optim"]
    assert os.path.isfile(os.path.join(path, "actor", "huggingface", "config.json"))
    meta = ckpt.read_meta(path)
    assert meta["global_step"] == 3 and meta["roles"] == ["actor"] and meta["actor"]["peft_type"] is None

    expected_model = {k: v.clone() for k, v in group.model.state_dict().items()}
    expected_optim = group.optimizer.state_dict()
    expected_lr = group.scheduler.get_last_lr()
    expected_coef = trainer.controller.divergence.value
    expected_draw = torch.rand(3)  # the RNG state was saved just before this draw

    fresh = fake_trainer(tmp_path / "run")
    fresh.actor_wg.model = tiny_text_model(seed=5)  # other weights: loading must overwrite them
    fresh.actor_wg.optimizer = fsdp_utils.build_optimizer(fresh.actor_wg.model, OptimConfig(lr=1e-2))
    fresh.actor_wg.scheduler = fsdp_utils.build_lr_scheduler(
        fresh.actor_wg.optimizer, OptimConfig(warmup_steps=3, lr_scheduler_type="cosine"), 10)
    assert resume(fresh) == path
    assert torch.equal(torch.rand(3), expected_draw)
    assert fresh.controller.global_step == 3 and fresh.controller.offset == 48
    assert fresh.controller.divergence.value == pytest.approx(expected_coef) and expected_coef != 0.1
    assert fresh.controller.entropy_bonus.value == pytest.approx(0.03)
    for key, value in fresh.actor_wg.model.state_dict().items():
        assert torch.equal(value, expected_model[key]), key
    got_optim = fresh.actor_wg.optimizer.state_dict()
    for index, state in expected_optim["state"].items():
        for name, value in state.items():
            assert torch.equal(got_optim["state"][index][name], value), (index, name)
    assert fresh.actor_wg.scheduler.get_last_lr() == expected_lr and fresh.actor_wg.scheduler.last_epoch == 3

    # Weights only (evaluation runs build no optimizer).
    model = tiny_text_model(seed=9)
    ckpt.load_fsdp_state(os.path.join(path, "actor"), model)
    assert all(torch.equal(v, expected_model[k]) for k, v in model.state_dict().items())


def test_interrupted_save_is_never_picked_and_is_cleaned_up(tmp_path):
    trainer = fake_trainer(tmp_path / "run")
    trainer.controller.global_step = 1
    save(trainer)
    run_dir = trainer.run_dir
    # A crash in the middle of saving step 2: its folder is still `.partial`, the tracker still says 1.
    partial = os.path.join(run_dir, "global_step_2" + ckpt.PARTIAL_SUFFIX)
    os.makedirs(os.path.join(partial, "actor", "model"))
    Path(partial, "actor", "model", ".metadata").write_text("truncated")
    # A crash after the rename but before the tracker: complete, but not yet recorded.
    assert ckpt.find_latest_checkpoint(run_dir).endswith("global_step_1")
    # A folder without its metadata file (the last thing written) is not a checkpoint.
    os.makedirs(os.path.join(run_dir, "global_step_7", "actor", "model"))
    Path(run_dir, "global_step_7", "actor", "model", ".metadata").write_text("x")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(run_dir)] == ["global_step_1"]
    # Without a tracker, the newest complete folder is used.
    os.remove(os.path.join(run_dir, ckpt.TRACKER_FILE))
    assert ckpt.find_latest_checkpoint(run_dir).endswith("global_step_1")
    # A tracker pointing at a missing folder falls back too.
    ckpt.write_tracker(run_dir, 9)
    assert ckpt.find_latest_checkpoint(run_dir).endswith("global_step_1")
    trainer.controller.global_step = 2
    save(trainer)
    assert not os.path.exists(partial)
    assert ckpt.read_tracker(run_dir) == 2
    # Saving the same step again replaces it.
    save(trainer)
    assert sorted(p for p in os.listdir(run_dir) if p.startswith("global_step_1") or p.startswith("global_step_2")) \
        == ["global_step_1", "global_step_2"]


def test_resume_path_selection(tmp_path):
    trainer = fake_trainer(tmp_path / "run")
    t = trainer.config.training
    assert resolve_resume_path(t, trainer.run_dir) is None  # nothing saved yet: a fresh start
    trainer.controller.global_step = 4
    saved = save(trainer)
    assert resolve_resume_path(t, trainer.run_dir) == saved
    t.find_last_checkpoint = False
    assert resolve_resume_path(t, trainer.run_dir) is None
    t.load_checkpoint_path = saved
    assert resolve_resume_path(t, trainer.run_dir) == saved
    t.load_checkpoint_path = trainer.run_dir  # the run folder, not a checkpoint: say which one to pass
    with pytest.raises(UserError, match=r"not a complete MTRL checkpoint.*global_step_4"):
        resolve_resume_path(t, trainer.run_dir)
    t.load_checkpoint_path = str(tmp_path / "nope")
    with pytest.raises(UserError, match="no such folder"):
        resolve_resume_path(t, trainer.run_dir)
    # A LoRA checkpoint cannot resume a full fine-tuning run (and vice versa).
    t.load_checkpoint_path = saved
    trainer.config.worker.actor.model.peft_type = "lora"
    with pytest.raises(UserError, match="peft_type"):
        resume(trainer)


def test_should_save():
    assert [s for s in range(1, 8) if should_save(3, s, s == 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if should_save(-1, s, s == 7)] == [7]


# ============================================================================= torch.distributed (slow)


def _reshard_worker(rank, world, folder, phase, port):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_text_model(seed=0 if phase == "save" else 7)
    fsdp_utils.apply_fsdp2(model, FSDPConfig(mixed_precision_dtype="fp32"), "cpu", list(model.model.layers))
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=2, lr_scheduler_type="linear")
    optimizer = fsdp_utils.build_optimizer(model, optim_cfg)
    scheduler = fsdp_utils.build_lr_scheduler(optimizer, optim_cfg, 10)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def snapshot(state):  # on one rank the "full" state dict may alias the live parameters
        return {k: snapshot(v) if isinstance(v, dict) else v.clone() if torch.is_tensor(v) else v
                for k, v in state.items()}

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 61, (4, 6), generator=g)
        share = ids.chunk(world)[rank]  # the same global batch, split over the ranks
        model(input_ids=share, labels=share).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    if phase == "save":
        step(1)
        step(2)
        ckpt.save_fsdp_state(os.path.join(folder, "actor"), model, optimizer, scheduler)
        saved = {"model": snapshot(get_model_state_dict(model, options=full)),
                 "optim": snapshot(get_optimizer_state_dict(model, optimizer, options=full))}
        step(3)
        saved["next"] = snapshot(get_model_state_dict(model, options=full))
    else:
        ckpt.load_fsdp_state(os.path.join(folder, "actor"), model, optimizer, scheduler)
        saved = {"model": snapshot(get_model_state_dict(model, options=full)),
                 "optim": snapshot(get_optimizer_state_dict(model, optimizer, options=full)),
                 "lr": scheduler.get_last_lr()}
        step(3)
        saved["next"] = snapshot(get_model_state_dict(model, options=full))
    if rank == 0:
        torch.save(saved, os.path.join(folder, f"{phase}_{world}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_state_loads_at_another_world_size(tmp_path):
    import torch.multiprocessing as mp

    from mtrl.single_controller.base import find_free_port

    mp.spawn(_reshard_worker, args=(2, str(tmp_path), "save", find_free_port()), nprocs=2)
    assert len([f for f in os.listdir(tmp_path / "actor" / "model") if f.endswith(".distcp")]) == 2
    mp.spawn(_reshard_worker, args=(1, str(tmp_path), "load", find_free_port()), nprocs=1)
    saved, loaded = torch.load(tmp_path / "save_2.pt"), torch.load(tmp_path / "load_1.pt")
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    for fqn, state in saved["optim"]["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["optim"]["state"][fqn][name], value), (fqn, name)
    assert loaded["lr"] == pytest.approx([1e-2])  # end of the 2-step warmup
    # The next step on one worker continues the two-worker run (up to float summation order). Adam turns
    # the summation-order noise of a near-zero gradient (the key biases': the softmax almost ignores them)
    # into a visible fraction of a step, so the bound is 0.1% of lr rather than float epsilon.
    for key, value in saved["next"].items():
        torch.testing.assert_close(loaded["next"][key], value, atol=1e-5, rtol=1e-5, msg=key)


# ============================================================================= end to end through the CLI (slow)


def cli_env():
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def run_cli(workdir: Path, name: str, *overrides: str, steps: int = 2, expect_rc: int = 0, logger="[file]"):
    """One `training_main` run of the quickstart's RL part (its `stages` dropped) in `workdir/runs/name` with the
    length reward, without validation unless overridden. Returns (process, metrics rows)."""
    reward = workdir / "length_reward.py"
    if not reward.exists():
        reward.write_text(LENGTH_REWARD)
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={QUICKSTART}", "stages=[]",
            f"training.max_steps={steps}", f"training.experiment_name={name}",
            f"training.save_checkpoint_path=runs/{name}", f"training.logger={logger}",
            "training.val_before_train=false", "dataset.val_files=", f"worker.reward.reward_fn_path={reward}",
            *overrides]
    proc = subprocess.run(args, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    path = workdir / "runs" / name / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return proc, rows


def by_step(rows):
    """The last row logged for each step (a resumed run appends)."""
    return {r["step"]: r for r in rows}


def computed_metrics(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES) and k != "step"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_e2e")


@pytest.fixture(scope="module")
def resumed_runs(workdir):
    """A: 4 steps straight (a checkpoint every step, keeping 2). B: 2 steps, stop, resume to 4."""
    _, rows_a = run_cli(workdir, "straight", "training.save_freq=1", "training.save_limit=2", steps=4)
    _, rows_b1 = run_cli(workdir, "resumed", steps=2)
    proc, rows_b = run_cli(workdir, "resumed", steps=4)
    return SimpleNamespace(a=workdir / "runs" / "straight", b=workdir / "runs" / "resumed", rows_a=rows_a,
                           rows_b1=rows_b1, rows_b=rows_b, resume_log=proc.stderr)


@pytest.mark.slow
def test_resume_gives_the_same_steps_as_an_uninterrupted_run(resumed_runs):
    r = resumed_runs
    a, b = by_step(r.rows_a), by_step(r.rows_b)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    assert [row["step"] for row in r.rows_b] == [1, 2, 3, 4]  # the resumed run continued at step 3
    assert "resumed from" in r.resume_log and "global_step_2 at step 2" in r.resume_log
    # The comparison means something: rewards vary, the policy moves.
    assert any(a[s]["reward/overall"] > 0 for s in (3, 4)) and all(a[s]["actor/grad_norm"] > 0 for s in (3, 4))
    assert any(abs(a[s]["actor/pg_loss"]) > 1e-4 for s in (3, 4))
    for step in (3, 4):
        expected, got = computed_metrics(a[step]), computed_metrics(b[step])
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=1e-6), f"step {step}: {key}"
    # And the final weights are the same.
    wa = ckpt.load_model_state_dict(str(r.a / "global_step_4" / "actor"))
    wb = ckpt.load_model_state_dict(str(r.b / "global_step_4" / "actor"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Checkpoints: every step with save_limit=2 keeps steps 3 and 4; the tracker names the last.
    assert sorted(p for p in os.listdir(r.a) if p.startswith("global_step")) == ["global_step_3", "global_step_4"]
    assert (r.a / ckpt.TRACKER_FILE).read_text().strip() == "4"
    assert sorted(p for p in os.listdir(r.b) if p.startswith("global_step")) == ["global_step_2", "global_step_4"]
    state = json.loads((r.b / "global_step_2" / ckpt.TRAINER_STATE_FILE).read_text())
    assert state["global_step"] == 2 and state["dataloader"]["offset"] == 2 * 16
    assert sorted(os.listdir(r.b / "global_step_2" / "actor")) == [
        "extra_state_rank_0.pt", "extra_state_rank_1.pt", "huggingface", "model", "optim"]


@pytest.mark.slow
def test_resume_on_fewer_workers_and_evaluate_a_checkpoint(workdir, resumed_runs):
    source = resumed_runs.b / "global_step_2"
    proc, rows = run_cli(workdir, "one_worker", f"training.load_checkpoint_path={source}",
                         "training.n_gpus_per_node=1", steps=3)
    assert [row["step"] for row in rows] == [3]
    assert "saved with 2 workers, now 1" in proc.stderr
    saved = workdir / "runs" / "one_worker" / "global_step_3"
    assert ckpt.read_meta(str(saved))["world_size"] == 1
    assert sorted(f for f in os.listdir(saved / "actor" / "model") if f.endswith(".distcp")) == ["__0_0.distcp"]
    # Training went on from the loaded weights (exactness of the load itself: test_sharded_state_loads_...).
    w2 = ckpt.load_model_state_dict(str(source / "actor"))
    w3 = ckpt.load_model_state_dict(str(saved / "actor"))
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    assert max(float((w2[k] - w3[k]).abs().max()) for k in w2) < 0.05  # one small step away, not a fresh model

    # Evaluation only: load the checkpoint's weights (no optimizer) and validate at its step.
    val = workdir / "outputs" / "quickstart" / "shapes" / "val.jsonl"
    _, rows = run_cli(workdir, "eval_only", "training.val_only=true", f"training.load_checkpoint_path={source}",
                      f"dataset.val_files={val}", "dataset.train_files=", "dataset.val_batch_size=16")
    assert len(rows) == 1 and rows[0]["step"] == 2 and "val/reward_score" in rows[0]
    assert not any(p.startswith("global_step") for p in os.listdir(workdir / "runs" / "eval_only"))


@pytest.mark.slow
def test_resume_with_critic_and_adaptive_divergence(workdir):
    """GAE (critic model + optimizer in the checkpoint) and the adaptive divergence coefficient: step 2 after
    resuming from step 1 (explicit load_checkpoint_path, into another run folder) equals step 2 straight."""
    extra = ("optimization.advantage_estimator=gae", "optimization.disable_divergence=false",
             "optimization.divergence_type=adaptive", "optimization.divergence_horizon=10", "training.save_freq=1")
    _, straight = run_cli(workdir, "gae_straight", *extra, steps=2)
    source = workdir / "runs" / "gae_straight" / "global_step_1"
    assert sorted(os.listdir(source / "critic")) == [
        "extra_state_rank_0.pt", "extra_state_rank_1.pt", "huggingface", "model", "optim"]
    assert ckpt.read_meta(str(source))["roles"] == ["actor", "critic"]
    _, resumed = run_cli(workdir, "gae_resumed", *extra, f"training.load_checkpoint_path={source}", steps=2)
    assert [row["step"] for row in resumed] == [2]
    expected, got = computed_metrics(by_step(straight)[2]), computed_metrics(resumed[0])
    assert expected["critic/vf_loss"] > 0 and expected["actor/divergence_coef"] != 0.01
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("mode,loss", [("dpo", "dpo/loss"), ("reward_model", "reward_model/loss")])
def test_preference_resume_gives_the_same_steps_as_an_uninterrupted_run(workdir, mode, loss):
    """DPO / reward model: 4 steps straight == 2 steps, stop, resume for 2 (metrics and final weights)."""
    pairs = ("training.mode=" + mode, "dataset.preference_files=outputs/quickstart/shapes/train_pairs.jsonl")
    _, straight = run_cli(workdir, f"{mode}_straight", *pairs, steps=4)
    _, first = run_cli(workdir, f"{mode}_resumed", *pairs, steps=2)
    proc, resumed = run_cli(workdir, f"{mode}_resumed", *pairs, steps=4)
    assert [row["step"] for row in first] == [1, 2] and [row["step"] for row in resumed] == [1, 2, 3, 4]
    assert "global_step_2 at step 2" in proc.stderr
    a, b = by_step(straight), by_step(resumed)
    grad_norm = loss.replace("/loss", "/grad_norm")
    assert all(a[s][grad_norm] > 0 for s in (3, 4)) and a[3][loss] != a[4][loss]
    for step in (3, 4):
        expected, got = computed_metrics(a[step]), computed_metrics(b[step])
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=1e-6), f"step {step}: {key}"
    run_a, run_b = workdir / "runs" / f"{mode}_straight", workdir / "runs" / f"{mode}_resumed"
    wa = ckpt.load_model_state_dict(str(run_a / "global_step_4" / "actor"))
    wb = ckpt.load_model_state_dict(str(run_b / "global_step_4" / "actor"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(os.listdir(run_b / "global_step_2" / "actor")) == [
        "extra_state_rank_0.pt", "extra_state_rank_1.pt", "huggingface", "model", "optim"]
    assert (run_b / "huggingface" / "config.json").is_file()  # exported at the end, as before


@pytest.mark.slow
def test_resume_after_a_crash_logs_each_step_once(workdir, resumed_runs):
    """A run that logged steps 3 and 4 but died before saving global_step_4: resuming from global_step_2
    drops the crashed run's rows of steps 3-4 from metrics.jsonl and logs them again, once."""
    crashed = workdir / "runs" / "crashed"
    shutil.copytree(resumed_runs.b, crashed)
    shutil.rmtree(crashed / "global_step_4")
    (crashed / ckpt.TRACKER_FILE).write_text("2\n")
    _, rows = run_cli(workdir, "crashed", steps=4)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    straight = by_step(resumed_runs.rows_a)
    for row in rows[2:]:
        expected = computed_metrics(straight[row["step"]])
        assert computed_metrics(row) == pytest.approx(expected, abs=1e-6, rel=1e-6)
