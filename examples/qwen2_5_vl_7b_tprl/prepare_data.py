"""Data for this recipe: ViRL39K (train) and MMK12 (validation), the VPPO paper's data, written as MTRL rows.

    python examples/qwen2_5_vl_7b_tprl/prepare_data.py [--limit N] [--force]      # from the repository root

Needs network access and `pip install datasets`; see examples/hub_rows.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hub_rows import outputs, prepare  # noqa: E402  (examples/hub_rows.py)

DATASETS = ["virl39k", "mmk12_val"]
OUTPUTS = outputs(DATASETS)  # the files config.yaml reads, relative to the repository root

if __name__ == "__main__":
    prepare(DATASETS)
