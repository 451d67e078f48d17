"""The package's import graph, read statically (imports inside functions and under TYPE_CHECKING count):
no cycle, and no lower layer importing a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "preactresnet"
HIGH = ("preactresnet.training", "preactresnet.reporting", "preactresnet.cli")  # the top: what runs a command
LOW = ("preactresnet.models", "preactresnet.data", "preactresnet.fileio", "preactresnet.system", "preactresnet.checkpoint",
       "preactresnet.evaluation", "preactresnet.whitening", "preactresnet.distributed", "preactresnet.plots", "preactresnet.pretrained")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module or "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: {d for d in imports_of(p, modules) if not (m.startswith(d + ".") and files[d].name == "__init__.py")}
            for m, p in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_never_import_higher_ones():
    wrong = [(m, d) for m, deps in graph().items() if m.startswith(LOW) for d in deps if d.startswith(HIGH)]
    assert not wrong, wrong


def test_files_and_functions_fit_on_a_screen():
    """No module over 300 lines, the loop under 250, no function over 40."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        limit = 250 if path.name == "loop.py" else 300
        if text.count("\n") > limit:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 40:
                too_long.append(f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
