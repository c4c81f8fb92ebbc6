"""Ray backend of the single controller: resource pools, actor-backed worker groups, colocation."""

from mtrl.single_controller.ray.base import (
    DEFAULT_WORKER_ENV,
    RayClassWithInitArgs,
    RayResourcePool,
    RayWorkerGroup,
    create_colocated_worker_cls,
    init_ray,
)

__all__ = [
    "DEFAULT_WORKER_ENV",
    "RayClassWithInitArgs",
    "RayResourcePool",
    "RayWorkerGroup",
    "create_colocated_worker_cls",
    "init_ray",
]
