"""The import graph, read from the source (ast): what each layer may import.

From the ground up: `host` (settings, the live config store, GPUs, the instance lock, metric
names) imports no other LocalMoE package; `moe_core` (serving) knows no queue, no Redis, no API
and no model building; `scheduler` (the job contract and routing) knows no API, no worker and no
engine; `api` and `workers` know neither each other nor model building (`moe_build`), which only
the roof uses: `localmoe` (the CLI and the launcher), which nothing imports. And no two modules
import each other, however indirectly, not even through an import inside a function or under
TYPE_CHECKING: a lazy import hides a cycle, it does not break it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("host", "api", "scheduler", "workers", "moe_core", "moe_build", "localmoe")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules `path` imports (absolute names; `from a import b` counts a.b when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _sources() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("host", ("api", "scheduler", "workers", "moe_core", "moe_build", "localmoe")),
        ("moe_core", ("moe_build", "api", "scheduler", "workers", "localmoe", "redis", "celery", "kombu")),
        ("moe_build", ("api", "scheduler", "workers", "localmoe", "redis", "celery", "kombu")),
        ("api", ("moe_build", "workers", "localmoe")),
        ("workers", ("moe_build", "api", "localmoe")),
        ("scheduler", ("moe_build", "api", "workers", "moe_core", "localmoe")),
    ],
)
def test_layers_import_only_what_lies_below(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = {
        (module, name)
        for module, path in _sources().items()
        if module.split(".")[0] == package
        for name in _imports(path, top_level_only=False)
        if name.split(".")[0] in forbidden
    }
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at-import-time", "lazy-imports-too"])
def test_no_import_cycle(top_level_only: bool) -> None:
    sources = _sources()
    graph = {
        m: {n for n in _imports(p, top_level_only) if n in sources and n != m} for m, p in sources.items()
    }
    # a package's module imports its package's __init__ implicitly; those arrows are not cycles
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_every_import_of_ours_names_a_module_that_exists() -> None:
    """mypy skips imports it cannot resolve (ignore_missing_imports): a module that moved (say
    localmoe.settings → host.settings) and a late import still naming its old place would pass
    the type check and fail only when that function runs."""
    ours = {*PACKAGES, "bench", "tests"}
    sources = {_module(p): p for pkg in ours for p in sorted((ROOT / pkg).rglob("*.py"))}
    missing = set()
    for module, path in sources.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            missing |= {(module, n) for n in names if n.split(".")[0] in ours and n not in sources}
    assert not missing, sorted(missing)
