"""Entry point: `python -m mtrl.training.training_main config=FILE [section.key=value ...]`."""

import sys
from typing import List, Optional

from mtrl.training.training_config import ConfigError, config_to_yaml, load_config, missing_rollout_engine

USAGE = """\
usage: python -m mtrl.training.training_main [config=FILE.yaml] [section.key=value ...] [print_config=true]

Fine-tunes a (vision-)language model with RL (PPO / GRPO / RLOO / ReMax / REINFORCE++ with the
TPRL token filters and trajectory shaping), driven by one config:
  dataclass defaults  <  config=FILE.yaml  <  dotted overrides on the command line

Sections: dataset, training, optimization, worker.{actor,critic,ref,rollout,reward}, stages.
training.mode: rl | sft | dpo | reward_model; `stages:` runs several in order (mtrl/training/stages.py).
Every key, its type and default: docs/CONFIG.md.

examples:
  python -m mtrl.training.training_main config=configs/quickstart.yaml
  python -m mtrl.training.training_main config=cfg.yaml training.experiment_name=x \\
      optimization.enable_perception_filtering=true worker.rollout.n=8
  python -m mtrl.training.training_main config=cfg.yaml training.val_only=true \\
      training.load_checkpoint_path=checkpoints/p/e/global_step_100
  RAY_ADDRESS=auto python -m mtrl.training.training_main config=cfg.yaml     # join a Ray cluster

print_config=true prints the resolved config and exits. Config errors exit with status 2.
"""

_TRUE = ("true", "1", "yes")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    print_only = False
    for arg in list(argv):
        if arg == "--print-config" or arg.split("=", 1)[0] == "print_config":
            print_only = arg == "--print-config" or arg.split("=", 1)[1].lower() in _TRUE
            argv.remove(arg)
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"mtrl: config error: {e}", file=sys.stderr)
        return 2
    if print_only:
        print(config_to_yaml(config), end="")
        return 0
    problem = missing_rollout_engine(config)
    if problem:
        print(f"mtrl: config error: {problem}", file=sys.stderr)
        return 2
    from mtrl.training.stages import run

    return run(config)  # stages, SFT / DPO / reward-model / CHORD runs, or plain RL (run_training)


if __name__ == "__main__":
    sys.exit(main())
