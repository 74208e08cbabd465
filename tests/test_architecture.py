"""The package's shape: every module imports, no import circle among svd_fast modules at module level, every
import deferred into a function says which heavy dependency it defers, and no module grows past 450 lines."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "svd_fast"
MAX_LINES = 450
# A deferred import names its reason after the code: `# noqa: PLC0415 - <what it defers, and why>`.
REASONED_NOQA = re.compile(r"#\s*noqa:[A-Z0-9, ]*PLC0415[A-Z0-9, ]*\s+-\s+\S")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The svd_fast modules an import statement in ``module`` names (``from package import submodule`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    named = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    if len(named) < len(node.names) and base in MODULES:
        named.append(base)
    return named


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: its body, and the bodies of top-level if/try blocks
    (not ``if TYPE_CHECKING:``), not functions or classes."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        statement = pending.pop()
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            found.append(statement)
        elif isinstance(statement, ast.If):
            if not (isinstance(statement.test, ast.Name) and statement.test.id == "TYPE_CHECKING"):
                pending.extend(statement.body + statement.orelse)
        elif isinstance(statement, ast.Try):
            pending.extend(statement.body + statement.orelse + statement.finalbody + [s for h in statement.handlers for s in h.body])
    return found


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {target for node in _top_level_imports(tree) for target in _imported_modules(node, module) if target != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_reason_rule_tells_a_reason_from_none() -> None:
    assert REASONED_NOQA.search("import av  # noqa: PLC0415 - PyAV is optional")
    assert REASONED_NOQA.search("import cv2  # noqa: F401, PLC0415 - OpenCV is optional")
    assert not REASONED_NOQA.search("import av  # noqa: PLC0415")
    assert not REASONED_NOQA.search("import av  # noqa: PLC0415 -")


def test_no_import_circle_among_svd_fast_modules() -> None:
    graph = _import_graph()
    assert "svd_fast.diffusers.generation" in graph["svd_fast.diffusers.generation_batch"]  # the graph sees real imports
    assert _cycles(graph) == []


def test_every_deferred_import_says_what_it_defers() -> None:
    unexplained = []
    for path in MODULES.values():
        source = path.read_text()
        lines = source.splitlines()
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                    if not REASONED_NOQA.search(text):
                        unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "deferred imports without `# noqa: PLC0415 - <reason>`:\n" + "\n".join(sorted(set(unexplained)))


def test_no_module_over_the_line_limit() -> None:
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


OPTIONAL = {"ray", "pytesseract", "cv2", "av", "pyarrow", "deepspeed", "nvidia", "flash_attn", "triton", "open_clip", "matplotlib"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as error:  # only an optional dependency that is not installed may stop it
        if (error.name or "").split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"optional dependency {error.name} is not installed")
