"""The package's shape: data flows one way. Module imports (at the top, inside functions and
under TYPE_CHECKING alike) form no cycle, the store knows no paging policy, and the runtime
package never imports the fake Clickatell."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "receiver"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of ``receiver`` → the modules it imports (of ``receiver`` and beyond)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # "from receiver.store import Changes" names the package; "from receiver import
                # holds" names a module: count a submodule where there is one
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists()
                              or (ROOT / sub.replace(".", "/")).is_dir() else node.module)
        graph[name] = {m for m in found if m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among ``receiver`` modules, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles():
    graph = imports()
    # a package imports its own modules (its __init__ re-exports them): not a cycle between rooms
    for name in list(graph):
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_store_knows_no_paging_policy():
    graph = imports()
    store = {name: deps for name, deps in graph.items() if name.startswith("receiver.store")}
    assert store, "receiver.store not found"
    for name, deps in store.items():
        policy = {d for d in deps if d.split(".")[:2] in (["receiver", m] for m in
                  ("paging", "holds", "pipeline", "summary", "planner", "dispatch", "routing", "render"))}
        assert not policy, f"{name} imports {policy}"


def test_the_runtime_never_imports_the_fake():
    for name, deps in imports().items():
        assert not any(d.startswith("fake_clickatell") for d in deps if name != "receiver.cli"), name
    # the CLI hands `fake-clickatell` to the fake's own package, imported only for that command
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    top = {a.name for node in cli.body if isinstance(node, ast.Import) for a in node.names}
    top |= {node.module for node in cli.body if isinstance(node, ast.ImportFrom)}
    assert "fake_clickatell" not in top


def test_the_store_names_no_hold_reason():
    """The paging policy's words (hold reasons, delivery modes) are data the store is given,
    never strings it compares against."""
    for path in (PACKAGE / "store").glob("*.py"):
        text = path.read_text()
        for word in ("'throttle'", "'digest", "'quiet hours'", '"throttle"', '"quiet hours"'):
            assert word not in text, f"{path.name} names {word}"
