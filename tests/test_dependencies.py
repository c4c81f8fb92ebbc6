"""The package's dependencies point one way: config <- models <- optimization <- agents <- workers <- training.

A static scan of every module's imports (top-level and the lazy ones inside functions), so a violation
fails here even when no test happens to run the code path that imports it.
"""

import ast
from pathlib import Path

import mtrl

PACKAGE_DIR = Path(mtrl.__file__).parent

# (importing package, imported package): never allowed.
FORBIDDEN = [(low, "mtrl.training") for low in
             ("mtrl.config", "mtrl.workers", "mtrl.agents", "mtrl.models", "mtrl.optimization", "mtrl.utils")]
FORBIDDEN += [("mtrl.agents", "mtrl.workers")]
FORBIDDEN += [(low, high) for low in ("mtrl.config", "mtrl.models", "mtrl.optimization")
              for high in ("mtrl.agents", "mtrl.workers")]


def module_names():
    """Every module of the package, from its files (no import needed)."""
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def source_path(name: str) -> Path:
    parts = name.split(".")[1:]
    package = PACKAGE_DIR.joinpath(*parts)
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def imported_modules(name: str):
    """Every module `name` imports anywhere in its source, relative imports resolved."""
    path = source_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:  # `from mtrl import training` imports the package mtrl.training
                yield f"{base}.{alias.name}", node.lineno


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations():
    found = {}
    for name in module_names():
        for imported, line in imported_modules(name):
            for low, high in FORBIDDEN:
                where = f"{source_path(name).relative_to(PACKAGE_DIR.parent)}:{line}"
                if inside(name, low) and inside(imported, high) and where not in found:
                    found[where] = f"{where}: {name} imports {imported} ({low} must not depend on {high})"
    return sorted(found.values())


def test_the_scan_sees_every_module_and_its_lazy_imports():
    names = module_names()
    assert {"mtrl.workers.actor.actor_worker", "mtrl.agents.parallel_policy_agent", "mtrl.models.loader",
            "mtrl.config.worker", "mtrl.training.distributed_trainer"} <= set(names)
    # A lazy import inside a function: init_workers imports the actor worker class.
    trainer_imports = {m for m, _ in imported_modules("mtrl.training.distributed_trainer")}
    assert "mtrl.workers.actor.actor_worker" in trainer_imports
    assert "mtrl.training.stages" in {m for m, _ in imported_modules("mtrl.training.training_config")}


def test_dependencies_point_one_way():
    assert violations() == []
