"""Training stages: an ordered `stages:` list run from one command (SFT warmup -> RL, RM -> RL, ...).

```yaml
stages:
  - name: sft_warmup
    mode: sft                       # sft | rl | dpo | reward_model
    training: {max_steps: 40}
    worker: {actor: {optim: {lr: 1.0e-3}}}
  - name: rl
    mode: rl                        # the top-level config as it is
```

Each stage runs with the top-level config plus the stage's overrides of any section (`dataset`,
`training`, `optimization`, `worker`), merged and validated like a config file: an unknown key or a
bad value in any stage is an error before anything starts, naming the stage.

* Run directory: `{run_dir}/{name}` (run_dir = training.save_checkpoint_path, or
  checkpoints/{project_name}/{experiment_name}), holding the stage's config.yaml, metrics.jsonl,
  checkpoints and, at the end, `huggingface/` (the trained model, written by rank 0 from the full
  state dict). The experiment name becomes `{experiment_name}-{name}`.
* Weights: a stage starts from the model the previous *policy* stage (sft, rl, dpo) exported, unless
  it sets `worker.actor.model.model_path` itself. A `reward_model` stage starts from it too (its
  backbone), and its export becomes `worker.reward.reward_model_path` of the later stages that use
  `reward_type: model` without a path of their own.
* Resume: a finished stage leaves `stage_done.json` in its directory, recording the settings it finished
  with (`Stage.settings`: max_steps, total_epochs, its data files). When the command runs again, a stage
  with the same settings is skipped (delete the file to run it again); one whose settings changed (say
  `training.max_steps` raised from 2 to 4) runs again and, through training.find_last_checkpoint,
  continues from its last checkpoint (steps 3-4). An interrupted stage resumes from its own checkpoints.

Without `stages:` a run is one stage of `training.mode` in run_dir itself; sft, dpo and reward_model
runs export to `{run_dir}/huggingface` too.
"""

import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from mtrl.training.training_config import (TRAINING_MODES, ConfigError, MTRLConfig, _choice, _merge, config_to_yaml,
                                           validate_config)

SECTIONS = ("dataset", "training", "optimization", "worker")
MARKER = "stage_done.json"
EXPORT_DIR = "huggingface"
POLICY_MODES = ("sft", "rl", "dpo")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Stage:
    index: int
    name: str
    mode: str
    config: MTRLConfig
    run_dir: str
    export_dir: str

    @property
    def marker(self) -> str:
        return os.path.join(self.run_dir, MARKER)

    @property
    def settings(self) -> Dict[str, Any]:
        """What "finished" refers to: the length of the stage's training and the data it trained on."""
        t, d = self.config.training, self.config.dataset
        files = {"sft": d.sft_files, "dpo": d.preference_files, "reward_model": d.preference_files}
        return {"max_steps": t.max_steps, "total_epochs": t.total_epochs,
                "data_files": files.get(self.mode, d.train_files)}

    def finished_with(self) -> Optional[Dict[str, Any]]:
        """The settings recorded when the stage last finished (None: not finished)."""
        try:
            with open(self.marker) as f:
                return json.load(f).get("settings", {})
        except FileNotFoundError:
            return None

    @property
    def done(self) -> bool:
        """Finished with the settings it has now."""
        return self.finished_with() == self.settings


def _nested_get(tree: Dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resolve_stages(config: MTRLConfig) -> List[Stage]:
    """Every stage's full config (validated), run directory and export folder, in order."""
    if not config.stages:
        return []
    base = replace(config, stages=[])
    base_node = OmegaConf.structured(base)
    root = config.training.run_dir
    seen, stages = set(), []
    policy_export: Optional[str] = None
    reward_export: Optional[str] = None
    for i, st in enumerate(config.stages):
        where = f"stages[{i}]"
        if not st.name or not _NAME.match(st.name):
            raise ConfigError(f"`{where}.name` = {st.name!r}: give each stage a name of letters, digits, `_`, `-`, "
                              f"`.` (it names the stage's run directory).")
        if st.name in seen:
            raise ConfigError(f"`{where}.name` = {st.name!r} is used by an earlier stage; stage names must differ.")
        seen.add(st.name)
        _choice(f"{where}.mode", st.mode, TRAINING_MODES)
        overrides = {k: OmegaConf.to_container(OmegaConf.create(getattr(st, k))) for k in SECTIONS if getattr(st, k)}
        given_mode = _nested_get(overrides, "training.mode")
        if given_mode is not None and given_mode != st.mode:
            raise ConfigError(f"`{where}.training.mode` = {given_mode!r} contradicts `{where}.mode` = {st.mode!r}.")
        node = _merge(base_node, overrides, f"stage {st.name!r} ({where})") if overrides else base_node.copy()
        node.training.mode = st.mode
        run_dir = _nested_get(overrides, "training.save_checkpoint_path") or os.path.join(root, st.name)
        node.training.save_checkpoint_path = run_dir
        if _nested_get(overrides, "training.experiment_name") is None:
            node.training.experiment_name = f"{config.training.experiment_name}-{st.name}"
        if policy_export is not None and _nested_get(overrides, "worker.actor.model.model_path") is None:
            node.worker.actor.model.model_path = policy_export
            node.worker.actor.model.build_tiny_if_missing = None
        if (node.worker.reward.reward_type == "model" and not node.worker.reward.reward_model_path
                and reward_export is not None):
            node.worker.reward.reward_model_path = reward_export
        try:
            stage_config: MTRLConfig = OmegaConf.to_object(node)
        except Exception as e:  # OmegaConf's own message names the key
            raise ConfigError(f"stage {st.name!r} ({where}): {e}") from None
        if stage_config.worker.critic.global_batch_size is None:
            stage_config.worker.critic.global_batch_size = stage_config.worker.actor.global_batch_size
        try:
            validate_config(stage_config)
        except ConfigError as e:
            raise ConfigError(f"stage {st.name!r} ({where}, mode {st.mode}): {e}") from None
        export_dir = os.path.join(run_dir, EXPORT_DIR)
        stages.append(Stage(i, st.name, st.mode, stage_config, run_dir, export_dir))
        if st.mode == "reward_model":
            reward_export = export_dir
        else:
            policy_export = export_dir
    return stages


def trainer_class(config: MTRLConfig):
    """The trainer for a config's mode (all take `(config, export_dir=None)`)."""
    mode = config.training.mode
    if mode == "sft":
        from mtrl.training.sft import SFTTrainer

        return SFTTrainer
    if mode in ("dpo", "reward_model"):
        from mtrl.training.preference import PreferenceTrainer

        return PreferenceTrainer
    if config.optimization.chord.enable:
        from mtrl.training.chord import ChordTrainer

        return ChordTrainer
    from mtrl.training.distributed_trainer import DistributedTrainer

    return DistributedTrainer


def _ray_cpus(configs: List[MTRLConfig]) -> int:
    return max(max(4, c.training.world_size + c.worker.reward.num_cpus + 1) for c in configs)


def write_done_marker(stage: Stage, settings: Dict[str, Any], seconds: float) -> None:
    if not os.path.isfile(os.path.join(stage.export_dir, "config.json")):
        raise RuntimeError(f"stage {stage.name!r} finished but wrote no model to {stage.export_dir}")
    tmp = stage.marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"name": stage.name, "mode": stage.mode, "index": stage.index, "export_dir": stage.export_dir,
                   "settings": settings, "seconds": round(seconds, 1),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=2)
    os.replace(tmp, stage.marker)


def _last_val(run_dir: str, key: str = "val/accuracy") -> Optional[float]:
    """The last logged `key` of a stage's metrics.jsonl (None when it logged none)."""
    value = None
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if key in row:
                    value = float(row[key])
    except OSError:
        return None
    return value


def print_summary(stages: List[Stage], root: str) -> None:
    """Where the metrics, plots and model are, and the validation accuracy of each stage (last lines)."""
    print("[mtrl] metrics: " + ", ".join(os.path.join(s.run_dir, "metrics.jsonl") for s in stages))
    print(f"[mtrl] plots: python -m mtrl.tools.plot {root}   (one PNG per stage)")
    print(f"[mtrl] checkpoint / final model (Hugging Face folder): {stages[-1].export_dir}")
    accs = [(s.name, _last_val(s.run_dir)) for s in stages]
    accs = [(n, a) for n, a in accs if a is not None]
    if len(accs) >= 2:
        (first, a0), (last, a1) = accs[0], accs[-1]
        print(f"[mtrl] val/accuracy: {first} {a0:.3f} -> after {last} {a1:.3f} ({a1 - a0:+.3f})")
    elif accs:
        print(f"[mtrl] val/accuracy after {accs[-1][0]}: {accs[-1][1]:.3f}")


def run_stages(config: MTRLConfig) -> int:
    """Run every unfinished stage in order on one Ray runtime. Returns the process exit code."""
    import ray

    from mtrl.single_controller.ray import init_ray
    from mtrl.training.trainer_base import run_training

    stages = resolve_stages(config)
    root = config.training.run_dir
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.yaml"), "w") as f:
        f.write(config_to_yaml(config))
    plan = ", ".join(f"{s.name} ({s.mode}{', done' if s.done else ''})" for s in stages)
    print(f"[mtrl] {len(stages)} stages in {root}: {plan}")
    started_ray = not ray.is_initialized()
    init_ray(num_cpus=_ray_cpus([s.config for s in stages]))
    try:
        for stage in stages:
            if stage.done:
                print(f"[mtrl] stage {stage.name!r} already finished ({stage.marker}); skipping it")
                continue
            before = stage.finished_with()
            if before is not None:
                changed = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in stage.settings.items()
                                    if before.get(k) != v)
                print(f"[mtrl] stage {stage.name!r} finished with other settings ({changed}); running it again "
                      f"(from its last checkpoint with training.find_last_checkpoint=true)")
            print(f"[mtrl] stage {stage.index + 1}/{len(stages)}: {stage.name!r} ({stage.mode}) -> {stage.run_dir}")
            settings = stage.settings  # as configured: the run makes the config's paths absolute
            start = time.perf_counter()
            rc = run_training(stage.config, trainer_class(stage.config), export_dir=stage.export_dir)
            if rc != 0:
                what = "stopped" if rc > 128 else "failed"
                print(f"mtrl: stage {stage.name!r} {what} (exit {rc}); finished stages are kept and skipped "
                      f"when the command runs again", file=sys.stderr)
                return rc
            write_done_marker(stage, settings, time.perf_counter() - start)
        print(f"[mtrl] all stages done. run directory: {root}; final model: {stages[-1].export_dir}")
        print_summary(stages, root)
        return 0
    finally:
        if started_ray:
            ray.shutdown()


def run(config: MTRLConfig) -> int:
    """The entry point's dispatcher: stages, a single sft / dpo / reward_model / CHORD run, or plain RL."""
    from mtrl.training.trainer_base import run_training

    if config.stages:
        return run_stages(config)
    export_dir = None if config.training.mode == "rl" else os.path.join(config.training.run_dir, EXPORT_DIR)
    return run_training(config, trainer_class(config), export_dir=export_dir)
