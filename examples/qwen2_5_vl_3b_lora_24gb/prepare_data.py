"""Data for this recipe: Geometry3K train and test, written as MTRL rows.

    python examples/qwen2_5_vl_3b_lora_24gb/prepare_data.py [--limit N] [--force]      # from the repository root

Needs network access and `pip install datasets`; see examples/hub_rows.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hub_rows import outputs, prepare  # noqa: E402  (examples/hub_rows.py)

DATASETS = ["geometry3k_train", "geometry3k_test"]
OUTPUTS = outputs(DATASETS)  # the files config.yaml reads, relative to the repository root

if __name__ == "__main__":
    prepare(DATASETS)
