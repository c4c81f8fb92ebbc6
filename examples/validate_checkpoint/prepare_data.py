"""Data for this recipe: MMK12 (validation), as in the VPPO paper, written as MTRL rows.

    python examples/validate_checkpoint/prepare_data.py [--limit N] [--force]      # from the repository root

Needs network access and `pip install datasets`; see examples/hub_rows.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hub_rows import outputs, prepare  # noqa: E402  (examples/hub_rows.py)

DATASETS = ["mmk12_val"]
OUTPUTS = outputs(DATASETS)  # the files config.yaml reads, relative to the repository root

if __name__ == "__main__":
    prepare(DATASETS)
