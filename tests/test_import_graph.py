"""The package's modules import each other without cycles, lazy imports included.

Every `import` statement of `src/two_tower` counts, at module level or inside a
function (a lazy import only hides a cycle until the function runs); imports
under `if TYPE_CHECKING:` do not run and are left out. A cycle means two modules
that cannot be understood, tested or moved one without the other.

Also: only `two_tower.backends` names a backend (`jax`, `tensorflow`, `torch`)
or compares `keras.backend.backend()` with one (tfds, a lazy import of the
MovieLens loader, is the one other exception).
"""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "two_tower"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_imports_and_skips_type_checking(tmp_path):
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import two_tower.b\n"
    source += "def f():\n    from two_tower import c\n"
    path = tmp_path / "a.py"
    path.write_text(source)
    known = {"two_tower.a", "two_tower.b", "two_tower.c"}
    assert imports_of("two_tower.a", path, known) == {"two_tower.c"}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40
    assert "two_tower.models.two_tower_retrieval" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


BACKEND_NAME = re.compile(
    r"^\s*(import (jax|tensorflow|torch)\b|from (jax|tensorflow|torch)\b)"
    r"|backend\(\)\s*[!=]=\s*['\"]|['\"](jax|tensorflow|torch)['\"]\s*[!=]=\s*\S*backend\(\)",
    re.M,
)


@pytest.mark.parametrize("name", [n for n in modules() if not n.startswith("two_tower.backends")])
def test_backends_are_named_only_in_backends(name):
    lines = modules()[name].read_text().splitlines()
    # Docstring examples may show the backend; library code may not branch on it.
    code = "\n".join(line for line in lines if not line.lstrip().startswith((">>>", "...")))
    found = [match.group(0).strip() for match in BACKEND_NAME.finditer(code)]
    found = [line for line in found if "tensorflow_datasets" not in line]
    assert not found, f"{name} speaks to a backend directly: {found}"
