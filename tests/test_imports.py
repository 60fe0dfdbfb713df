"""No import cycle among shardkit's modules: each layer imports downwards (docs/architecture.md). Counted
are the imports at module level, which run when a module is first imported and so decide the order in
which modules can load; an import inside a function runs later, once everything has loaded, and is how a
lower layer reaches an optional, heavy one (torch, the engine) on demand."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only (see above)
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("shardkit")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (SRC / "shardkit").rglob("*.py")}
    # A module's own ancestor packages do not count: they are already being imported whenever it is (``from .
    # import sibling`` names the package only to reach the sibling).
    return {name: {m for m in module_imports(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle_among_shardkit_modules():
    edges = graph()
    assert "shardkit.orchestration.row" in edges["shardkit.orchestration.containers"]
    assert cycles(edges) == []


def test_containers_only_runs_a_row_and_never_imports_the_campaign():
    path = SRC / "shardkit" / "orchestration" / "containers.py"
    everywhere = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            everywhere |= {alias.name for alias in node.names} | {node.module or ""}
    assert "campaign" not in everywhere
