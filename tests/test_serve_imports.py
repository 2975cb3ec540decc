"""What imports what across the three packages.

serve/'s modules import one another without a circle, counting imports
inside functions: an import moved into a function to dodge a circle hides
the circle, it does not remove it. job/ imports nothing from serve/ (the
training image carries no serve/) and common/ neither of them (both images
carry it), again counting imports inside functions. And common/ imports, as
its modules load, only what both images install."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import serve

PACKAGE = Path(serve.__file__).parent
ROOT = PACKAGE.parent


def all_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules `path` imports: anywhere in it, or only as it loads (its own
    statements, outside any function or class)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if not top_level_only else _module_level(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _module_level(body: list[ast.stmt]):
    """The statements run as the module loads: into if/try/with blocks and class bodies, not into functions."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level(getattr(node, field, []))


def imports(path: Path, modules: set[str]) -> set[str]:
    """The serve modules `path` imports anywhere in it."""
    return all_imports(path) & modules


def package_imports(package: str, top_level_only: bool = False) -> dict[str, set[str]]:
    """{module file relative to the checkout: the modules it imports} for every module of `package`."""
    return {path.relative_to(ROOT).as_posix(): all_imports(path, top_level_only)
            for path in sorted((ROOT / package).rglob("*.py"))}


def test_serve_has_no_import_circle():
    files = {("serve." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {m: imports(path, modules - {m}) for m, path in files.items() if m != "serve"}

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


def _from(names: set[str], package: str) -> set[str]:
    return {name for name in names if name == package or name.startswith(package + ".")}


def test_the_job_imports_nothing_from_the_service():
    # Dockerfile.train copies no serve/: what both need belongs in common/.
    found = {path: _from(names, "serve") for path, names in package_imports("job").items()}
    assert not {path: names for path, names in found.items() if names}
    assert "COPY serve" not in (ROOT / "Dockerfile.train").read_text()


def test_the_shared_code_imports_neither_the_job_nor_the_service():
    found = {path: _from(names, "job") | _from(names, "serve") for path, names in package_imports("common").items()}
    assert not {path: names for path, names in found.items() if names}


def test_the_shared_code_loads_with_only_what_both_images_install():
    """Both images install pyproject.toml's own dependencies, and each its own extras besides: so as
    common/'s modules load they import only the standard library and those (TensorFlow, say, inside
    a function, where only the code that runs in one image reaches it)."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = {_normal(re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0]) for req in requirements}
    distributions = importlib.metadata.packages_distributions()
    allowed = set(sys.stdlib_module_names) | {"__future__", "common"}
    allowed |= {top for top, dists in distributions.items() if {_normal(d) for d in dists} & installed}
    found = {path: {name for name in names if name.split(".")[0] not in allowed}
             for path, names in package_imports("common", top_level_only=True).items()}
    assert not {path: names for path, names in found.items() if names}


def _normal(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()
