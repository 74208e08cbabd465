"""pyproject's install extras cover what each command imports: a static walk (ast) of the svd_fast modules each
command module reaches, every third-party top-level import mapped to its distribution through the installed
packages' metadata, checked against the command's extra. No network."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

REPO = Path(__file__).resolve().parents[1]
# Command module -> the extra that must cover it.
COMMAND_EXTRAS = {
    "svd_fast.commands.generate": "generate",
    "svd_fast.commands.make_tiny": "generate",
    "svd_fast.commands.train": "train",
    "svd_fast.train": "train",
    "svd_fast.commands.encode": "train",
    "svd_fast.commands.curate": "curate",
    "svd_fast.commands.demo": "demo",
    "svd_fast.commands.env": None,  # the base install
}
# Imports of optional components, always lazy and behind an option: top-level name -> the extra that provides it.
OPTIONAL_IMPORTS = {"ray": "ray", "nvidia": "dali-cu13", "flash_attn": "flash", "triton": "triton", "tensorboard": "tensorboard",
                    "wandb": "wandb", "bitsandbytes": "bitsandbytes"}


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def _imports(name: str) -> set[str]:
    path = _module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names if _module_file(f"{module}.{alias.name}")}
    return found


def third_party_imports(root: str) -> set[str]:
    """Top-level names of the non-stdlib, non-svd_fast modules imported anywhere (also lazily) in the svd_fast
    modules ``root`` reaches, its parent packages included."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for imported in _imports(name):
            top = imported.split(".")[0]
            if top == "svd_fast":
                if _module_file(imported):
                    todo.append(imported)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_packages(extra: str | None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = list(project["dependencies"])
    pending = [extra] if extra else []
    while pending:
        for requirement in extras[pending.pop()]:
            self_reference = re.fullmatch(r"svd_fast\[(.+)\]", requirement)
            if self_reference:
                pending += self_reference.group(1).split(",")
            else:
                requirements.append(requirement)
    return {_normalise(re.split(r"[\[<>=!~; ]", requirement)[0]) for requirement in requirements}


DISTRIBUTIONS = importlib.metadata.packages_distributions()


@pytest.mark.parametrize("command", sorted(COMMAND_EXTRAS))
def test_extra_covers_the_command_imports(command: str) -> None:
    declared = declared_packages(COMMAND_EXTRAS[command])
    missing = {}
    for top in sorted(third_party_imports(command) - set(OPTIONAL_IMPORTS)):
        distributions = {_normalise(name) for name in DISTRIBUTIONS.get(top, [])}
        assert distributions, f"{command} imports {top!r}, which no installed distribution provides"
        if not distributions & declared:
            missing[top] = sorted(distributions)
    extra = COMMAND_EXTRAS[command] or "the base dependencies"
    assert not missing, f"{command} imports {missing}, not declared in {extra}"


def test_optional_components_have_extras() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for top, extra in OPTIONAL_IMPORTS.items():
        assert extra in extras, extra
        distributions = {_normalise(name) for name in DISTRIBUTIONS.get(top, [])}
        if distributions:  # installed here: the extra names that distribution
            assert distributions & declared_packages(extra), (top, extra)
    assert {"dali-cu12", "dali-cu13", "dev"} <= set(extras)


def test_the_walk_sees_lazy_imports() -> None:
    # deepspeed is imported only inside functions (svd_fast.training.deepspeed_import): the walk must find it.
    assert "deepspeed" in third_party_imports("svd_fast.commands.train")
    assert "deepspeed" not in third_party_imports("svd_fast.commands.make_tiny")
