"""The package's layering rules, read from the source (issue 13): no import cycle inside ``lightning_tp``,
no module over 500 lines, and private Lightning/torch symbols imported only by ``lightning_tp/_compat.py``."""

from __future__ import annotations

import ast
from pathlib import Path

from paths import ROOT

PACKAGE = ROOT / "lightning_tp"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def _imports(file: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``file`` imports anywhere (top level or inside functions). ``from pkg import x``
    counts as importing ``pkg.x`` when that is a module, else ``pkg``."""
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycle_inside_the_package() -> None:
    modules = _modules()
    graph = {name: _imports(file, name, modules) for name, file in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them: a submodule that imports
    # its own package's __init__ would be, and is counted (edges into a package come from explicit imports).
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_500_lines() -> None:
    long = {str(f.relative_to(ROOT)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _private_uses(tree: ast.AST) -> list[str]:
    """Private (``_``-prefixed, not dunder) Lightning/torch names imported or reached by attribute."""
    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "lightning"):
            parts = node.module.split(".") + [alias.name for alias in node.names]
            found += [f"{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}"
                      for _ in [0] if any(private(p) for p in parts)]
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] in ("torch", "lightning")
                      and any(private(p) for p in alias.name.split("."))]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ("torch", "lightning"):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_private_lightning_and_torch_symbols_only_in_the_compat_module() -> None:
    uses = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.name == "_compat.py":
            continue
        found = _private_uses(ast.parse(file.read_text()))
        if found:
            uses[str(file.relative_to(ROOT))] = found
    assert uses == {}


def test_the_private_use_finder_sees_each_form() -> None:
    source = ("from torch.distributed.checkpoint._traverse import set_element\n"
              "from lightning.fabric.utilities.imports import _IS_INTERACTIVE\n"
              "import torch._inductor.config\n"
              "x = torch.distributed._symmetric_memory\n"
              "from torch.distributed.tensor import DTensor\n"
              "y = torch.__version__\n")
    assert [u.split(":")[0] for u in _private_uses(ast.parse(source))] == ["1", "2", "3", "4"]
