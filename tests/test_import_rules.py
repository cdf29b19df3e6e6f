"""The layering of fedmount/ and the size of its modules, checked on the source (nothing is imported).

Bottom to top: `fedmount.arvados` (pure formats) and the standalone helpers; the API side
(`fedmount.api`) and the Keep side (`fedmount.blocks`), which never import each other;
the filesystem (`fedmount.fs`); and on top the daemon, the commands, `locality` and
`runner`. Every import counts, including those inside functions and under TYPE_CHECKING:
a layer that needs a name from above it is in the wrong place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fedmount"
# Helpers that import nothing of fedmount, so that every layer may use them.
STANDALONE = {"fedmount.stats", "fedmount.memory", "fedmount.cliutil", "fedmount.mountinfo",
              "fedmount.defaults", "fedmount.records"}

# What each part may import from fedmount besides itself and the standalone helpers.
ALLOWED = {
    "fedmount.arvados": set(),
    "fedmount.api": {"fedmount.arvados"},
    "fedmount.blocks": {"fedmount.arvados"},
    "fedmount.fs": {"fedmount.arvados", "fedmount.api", "fedmount.blocks"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every fedmount module (or package) `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("fedmount.")}  # `from fedmount import x` counts as x


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def part_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_layer_imports_only_what_lies_below_it(part):
    allowed = ALLOWED[part] | {part} | STANDALONE
    wrong = {
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if part_of(name) == part
        for target in targets
        if part_of(target) not in allowed and target not in allowed
    }
    assert not wrong, sorted(wrong)


def test_standalone_helpers_import_nothing_of_fedmount():
    wrong = {f"{name} imports {t}" for name in STANDALONE & GRAPH.keys() for t in GRAPH[name]}
    assert not wrong, sorted(wrong)


def test_pyfuse3_is_imported_only_by_the_fuse_adapter():
    importers = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "pyfuse3" for a in node.names):
                importers.add(name)
            if isinstance(node, ast.ImportFrom) and node.module == "pyfuse3":
                importers.add(name)
    assert importers == {"fedmount.fs.fuse"}


def test_there_are_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    # A package's __init__ naming its own submodules is not a cycle of code.
    real = [c for c in cycles if not any(a == b.rpartition(".")[0] for a, b in zip(c, c[1:], strict=False))]
    assert not real, real


MAX_MODULE_LINES = 500


def test_no_module_is_over_500_lines():
    """A module that grows past this does more than one job: split it by job."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
