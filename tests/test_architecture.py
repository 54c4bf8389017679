"""The package rooms of src/ import downhill only, with no circles and no hidden imports.

The order, bottom to top, is the one docs/architecture.md draws; a package may import from
the packages below it and from itself. An import of ``src`` inside a function (the usual way
to dodge a circle) is refused everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

from src.common.paths import REPO_ROOT

LAYERS = [
    ["common"],
    ["config"],
    ["runs"],
    ["data"],
    ["models"],
    ["checkpoints"],
    ["storage"],
    ["telemetry"],
    ["cloud"],
    ["utils"],
    ["launch"],
    ["trainers"],
    ["export", "integrations"],
    ["sweeps", "slurm", "remote"],
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}
SRC = REPO_ROOT / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def src_imports(tree: ast.Module, source: str = "") -> list[tuple[str, int, bool]]:
    """(imported src module, line, at module level) for every import of src.*.

    An import in a function counts as top-level when its line says why it must wait with a
    ``# lazy:`` comment (the remote agent answers `status` on a host before the install).
    """
    lines = source.splitlines()
    in_functions = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(node)
    }
    top_level = {
        id(node)
        for node in ast.walk(tree)
        if id(node) not in in_functions
        or (bool(lines) and hasattr(node, "lineno") and "# lazy:" in lines[node.lineno - 1])
    }
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src"):
            names = [node.module]
            # `from src.pkg import module` imports the module src.pkg.module
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("src")]
        for name in names:
            found.append((name, node.lineno, id(node) in top_level))
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in SRC.rglob("*.py")}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_place_in_the_layers_and_says_its_job() -> None:
    packages = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())
    assert sorted(LEVEL) == packages, "add the new package to LAYERS and docs/architecture.md"
    for package in packages:
        doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text()))
        assert doc, f"src/{package}/__init__.py needs a docstring saying the package's job"


def test_imports_run_downhill_and_none_hides_in_a_function() -> None:
    modules = all_modules()
    problems = []
    for name, path in sorted(modules.items()):
        here = package_of(name)
        source = path.read_text()
        for imported, line, at_top in src_imports(ast.parse(source), source):
            if imported not in modules:
                continue  # `from src.pkg import name`: the name is not a module
            where = f"{path.relative_to(REPO_ROOT)}:{line} imports {imported}"
            if not at_top:
                problems.append(f"{where} inside a function or block")
            there = package_of(imported)
            if here is None or there is None or there == here:
                continue
            if LEVEL[there] >= LEVEL[here]:
                problems.append(f"{where}: {there} is not below {here}")
    assert not problems, "\n".join(problems)


def test_no_import_circles_between_modules() -> None:
    modules = all_modules()
    graph = {
        name: {
            imported
            for imported, _, _ in src_imports(ast.parse(path.read_text()))
            if imported in modules and imported != name
        }
        for name, path in modules.items()
    }
    # A package's __init__ importing its own modules is not a circle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".") or m == "src"}
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node) :]))
        if node in done:
            return
        stack.append(node)
        for following in sorted(graph[node]):
            visit(following)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
