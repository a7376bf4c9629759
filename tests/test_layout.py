"""The package's layout as docs/DESIGN.md states it: arrows between modules point one way (no import
cycle, no import hidden inside a function to dodge one), packages depend only on the layers below
them, and no module grows past ~400 lines."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "moe_core"
MAX_LINES = 400
# The layer each part may import from (besides itself); "core" is every top-level module.
ALLOWED = {
    "core": {"core"},
    "data": {"core"},
    "train": {"core", "data"},
    "sweep": {"core", "train"},
    "bench": {"core", "data", "train", "sweep", "analysis"},
    "analysis": {"core", "train", "sweep"},
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """Absolute moe_core module names an ``import``/``from`` statement reads."""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if not base.startswith("moe_core"):
        return []
    known = _modules()
    names = [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n in known] or [base]


def _imports(module: str, path: Path) -> tuple[set[str], list[str]]:
    """(moe_core modules imported at module level, moe_core imports made inside functions)."""
    tree = ast.parse(path.read_text())
    top, lazy = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = _resolve(module, path, node)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("moe_core")]
        else:
            continue
        if not targets:
            continue
        if node in tree.body or any(node in getattr(n, "body", []) for n in tree.body if isinstance(n, ast.If)):
            top |= set(targets)
        else:
            lazy += [f"{module} line {node.lineno}: {t}" for t in targets]
    return top, lazy


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # moe_core/__init__.py re-exports the core API
        return "core"
    if parts[1] == "workers":  # the kernels a sweep's workers keep
        return "sweep"
    return parts[1] if parts[1] in ALLOWED else "core"


GRAPH = {m: _imports(m, p) for m, p in _modules().items()}


def test_the_graph_sees_relative_and_absolute_imports():
    """The checks below are only as good as the graph: spot-check edges of each kind."""
    assert {"moe_core.routing", "moe_core.dispatch", "moe_core.config"} <= GRAPH["moe_core.moe"][0]
    assert "moe_core.train" in GRAPH["moe_core.sweep"][0]
    assert any(t.startswith("moe_core.data") for t in GRAPH["moe_core.train.config"][0])
    assert "moe_core.fused" in GRAPH["moe_core.dispatch"][0]
    assert _part("moe_core.fused.kernels") == "core"  # the fused backend's package sits at the core level


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, (set(), []))[0]):
            if nxt == node or nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [])


def test_no_lazy_imports_of_the_package():
    lazy = [entry for _, found in GRAPH.values() for entry in found]
    assert not lazy, "imports of moe_core inside functions (import at the top instead):\n" + "\n".join(lazy)


def test_parts_import_only_the_layers_below_them():
    wrong = [f"{m} ({_part(m)}) imports {t} ({_part(t)})" for m, (top, _) in GRAPH.items() for t in top
             if _part(t) != _part(m) and _part(t) not in ALLOWED[_part(m)]]
    assert not wrong, "\n".join(wrong)


def test_modules_stay_small():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
