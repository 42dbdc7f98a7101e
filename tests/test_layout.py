"""The package's layering (DESIGN.md): cli -> commands -> models/methods, data -> nn, losses,
metrics. Every import is counted, those inside functions too, so a lazy import cannot hide a
circle."""

from __future__ import annotations

import ast
from pathlib import Path

import seglight

ROOT = Path(seglight.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the seglight modules it imports (a package import counts as its __init__)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from seglight.data import stats` imports a module, else a name of the package
                found = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            else:
                continue
            targets.update(t for t in found if t in modules and t != name)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    # a module importing its own package (whose __init__ re-exports the package's modules) is
    # not a circle of the design: leave those edges out
    graph = import_graph()
    for name, targets in graph.items():
        targets -= {t for t in targets if name.startswith(t + ".")}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_cli_imports_the_commands():
    for name, targets in import_graph().items():
        if name.startswith(("seglight.commands", "seglight.cli", "seglight.__main__")):
            continue
        bad = sorted(t for t in targets if t.startswith(("seglight.commands", "seglight.cli")))
        assert not bad, f"{name} imports {bad}: only seglight.cli may import the commands"


def test_help_imports_no_heavy_libraries():
    """`seglight --help` lists every command without importing torch or Lightning."""
    import subprocess
    import sys

    code = (
        "import sys; from seglight.cli import run; run(['--help']); "
        "print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for command in ("fit", "test", "predict", "models", "datasets", "stats", "compare"):
        assert f"\n  {command} " in out
    for command in ("sweep", "export", "bench"):
        assert f"\n  {command} " in out
    assert out.strip().endswith("[]"), out
