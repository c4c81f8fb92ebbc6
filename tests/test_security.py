"""Security audit (issue 17): no unrestricted unpickling of checkpoint files, no remote code unless asked for."""

import ast
import os
import random

import numpy as np
import pytest
import torch

import mtrl
from mtrl.config.worker import ModelConfig
from mtrl.utils.checkpoint import load_torch_file, rng_state, set_rng_state

PACKAGE = os.path.dirname(os.path.abspath(mtrl.__file__))


def package_calls(predicate):
    """(file:line, call) of every call in the package's sources for which predicate(call) holds."""
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                tree = ast.parse(open(path, encoding="utf-8").read(), path)
                found += [(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}", node) for node in ast.walk(tree)
                          if isinstance(node, ast.Call) and predicate(node)]
    return found


def keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(value):
    return isinstance(value, ast.Constant) and value.value is True


def test_every_torch_load_uses_weights_only():
    loads = package_calls(lambda c: isinstance(c.func, ast.Attribute) and c.func.attr == "load"
                          and isinstance(c.func.value, ast.Name) and c.func.value.id == "torch")
    assert loads, "the scan found no torch.load at all: it is not looking at the package"
    unsafe = [where for where, call in loads if not is_true(keyword(call, "weights_only"))]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    assert not package_calls(lambda c: isinstance(c.func, ast.Attribute) and c.func.attr in ("load", "loads")
                             and isinstance(c.func.value, ast.Name) and c.func.value.id in ("pickle", "dill"))


def test_trust_remote_code_is_never_switched_on_by_the_package():
    assert ModelConfig().trust_remote_code is False
    forced = package_calls(lambda c: is_true(keyword(c, "trust_remote_code")))
    assert not forced, f"trust_remote_code=True hard-coded at {[w for w, _ in forced]}"


def test_state_files_round_trip_with_weights_only_and_refuse_code(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = str(tmp_path / "extra_state_rank_0.pt")
    torch.save({"rng": rng_state(), "lr_scheduler": {"last_epoch": 4, "_last_lr": [0.5]}}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = load_torch_file(path)
    assert loaded["lr_scheduler"] == {"last_epoch": 4, "_last_lr": [0.5]}
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"rng": Payload()}, str(tmp_path / "evil.pt"))
    with pytest.raises(Exception, match="Weights only load failed"):
        load_torch_file(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
