"""serve/'s modules import one another without a circle, counting imports
inside functions: an import moved into a function to dodge a circle hides
the circle, it does not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

import serve

PACKAGE = Path(serve.__file__).parent


def imports(path: Path, modules: set[str]) -> set[str]:
    """The serve modules `path` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & modules


def test_serve_has_no_import_circle():
    modules = {"serve." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in modules}
    graph = {m: imports(PACKAGE.joinpath(*m.split(".")[1:]).with_suffix(".py"), modules - {m})
             for m in modules if m != "serve"}

    def circle_from(module: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        if module in path:
            return path[path.index(module):] + (module,)
        for imported in sorted(graph.get(module, ())):
            found = circle_from(imported, path + (module,))
            if found:
                return found
        return None

    for module in sorted(graph):
        circle = circle_from(module, ())
        assert circle is None, " -> ".join(circle)
