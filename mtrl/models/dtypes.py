"""The one map from config dtype names to torch dtypes (`fsdp.mixed_precision_dtype`, export `--dtype`, loading)."""

from typing import Union

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch's own names, and how they appear in a model's config.json ("torch_dtype": "bfloat16").
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """`"bf16"` / `"fp16"` / `"fp32"`, torch's names (`"bfloat16"`, `"torch.float16"`, ...) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or torch's name / a torch.dtype)")
    return DTYPES[name]
