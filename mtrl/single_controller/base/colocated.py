"""Several worker roles (actor, critic, reference, ...) in ONE process.

Colocating roles lets them share a device and the process's torch.distributed group without a
process per role. `make_colocated_class` builds a `Worker` subclass that instantiates every role
object in its `__init__` and exposes each role's registered methods as `<role>__<method>`; a group
view per role (`RayWorkerGroup.spawn`) binds the role's methods under their plain names onto those
prefixed entry points, so `groups["critic"].compute_values(batch)` dispatches like a plain group.
Backend-agnostic: the Ray side only turns the class into an actor.
"""

from typing import Any, Callable, Dict, Mapping, Tuple

from mtrl.single_controller.base.decorator import registered_methods
from mtrl.single_controller.base.worker import Worker

ROLE_SEPARATOR = "__"

# role -> (worker class, positional init args, keyword init args)
RoleSpecs = Mapping[str, Tuple[type, tuple, Dict[str, Any]]]


def role_method_prefix(role: str) -> str:
    return role + ROLE_SEPARATOR


def check_role_name(role: str) -> None:
    if not role.isidentifier() or ROLE_SEPARATOR in role or role.startswith("_"):
        raise ValueError(f"role name {role!r} must be an identifier without {ROLE_SEPARATOR!r} "
                         "and without a leading underscore")


class ColocatedWorker(Worker):
    """Holds one object per role in this process; subclasses made by `make_colocated_class`."""

    role_classes: Dict[str, type] = {}

    def __init__(self, role_specs: RoleSpecs) -> None:
        # Worker.__init__ first: on rank 0 it fixes the rendezvous address before any role needs it.
        super().__init__()
        self.roles: Dict[str, Worker] = {role: cls(*args, **kwargs) for role, (cls, args, kwargs) in role_specs.items()}


def _make_proxy(role: str, name: str, doc: str) -> Callable:
    def proxy(self: ColocatedWorker, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.roles[role], name)(*args, **kwargs)

    proxy.__name__ = proxy.__qualname__ = role_method_prefix(role) + name
    proxy.__doc__ = doc
    return proxy


def make_colocated_class(role_classes: Mapping[str, type]) -> type:
    """A `ColocatedWorker` subclass whose `<role>__<method>` methods forward to each role's methods.

    The methods must exist on the class itself (not be resolved dynamically) because Ray builds an
    actor's method table from its class.
    """
    if not role_classes:
        raise ValueError("colocation needs at least one role")
    attrs: Dict[str, Any] = {"role_classes": dict(role_classes), "__module__": __name__}
    for role, cls in role_classes.items():
        check_role_name(role)
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            raise TypeError(f"role {role!r}: {cls!r} is not a Worker subclass")
        for name in registered_methods(cls):
            attrs[role_method_prefix(role) + name] = _make_proxy(role, name, getattr(cls, name).__doc__)
    class_name = "Colocated_" + "_".join(role_classes)
    return type(class_name, (ColocatedWorker,), attrs)
