"""Data for this recipe: GSM8K train and test (text only; the answer is the number after ####), written as MTRL rows.

    python examples/qwen2_5_7b_gsm8k_grpo/prepare_data.py [--limit N] [--force]      # from the repository root

Needs network access and `pip install datasets`; see examples/hub_rows.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hub_rows import outputs, prepare  # noqa: E402  (examples/hub_rows.py)

DATASETS = ["gsm8k_train", "gsm8k_test"]
OUTPUTS = outputs(DATASETS)  # the files config.yaml reads, relative to the repository root

if __name__ == "__main__":
    prepare(DATASETS)
