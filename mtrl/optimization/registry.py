"""Functions chosen by a config name: the advantage-estimator and policy-loss registries are both a ``Registry``."""

from typing import Callable, Dict, TypeVar

Fn = TypeVar("Fn", bound=Callable)


class Registry(Dict[str, Callable]):
    """A dict from config name to function, with a registering decorator and a lookup that lists the known names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Fn], Fn]:
        """Decorator adding the function under ``name``; a second, different function for a name is an error."""

        def decorator(fn: Fn) -> Fn:
            if name in self and self[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn
            return fn

        return decorator

    def lookup(self, name: str) -> Callable:
        """The function registered as ``name``; ValueError listing the known names otherwise."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
        return self[name]
