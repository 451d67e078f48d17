"""The package's shape, read statically: its import graph (imports inside functions and under TYPE_CHECKING
count) has no cycle and no lower layer importing a higher one; files and functions fit on a screen; the Trainer
owns its parts (no base class, every attribute declared in its class's __init__, nothing calls back into it)."""

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
    """No module over 300 lines, the loop under 220, no function over 40."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        limit = 219 if path.name == "loop.py" else 300
        if text.count("\n") > limit:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 40:
                too_long.append(f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def _self_assigned(function: ast.FunctionDef) -> set[str]:
    """The names a method assigns on `self` (self.x = ..., self.x, self.y = ..., self.x += ...)."""
    names = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def test_every_attribute_is_declared_in_its_class_init():
    """In training/, a method may set only what its class's __init__ (or a dataclass field) declares."""
    undeclared = []
    for path in (PACKAGE / "training").glob("*.py"):
        for cls in [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)]:
            methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
            declared = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            declared |= {a for m in methods if m.name == "__init__" for a in _self_assigned(m)}
            undeclared += [f"{path.name}:{cls.name}.{m.name} sets self.{a}" for m in methods for a in _self_assigned(m) - declared]
    assert not undeclared, undeclared


def test_the_trainer_owns_its_parts_and_nothing_calls_back_into_it():
    """`class Trainer` has no base class; no module but the loop calls a Trainer method."""
    from preactresnet.training import Trainer

    assert Trainer.__bases__ == (object,)
    loop = ast.parse((PACKAGE / "training" / "loop.py").read_text())
    trainer = next(n for n in ast.walk(loop) if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = {n.name for n in trainer.body if isinstance(n, ast.FunctionDef)}
    calls = []
    for path in PACKAGE.rglob("*.py"):
        if path.name != "loop.py":
            tree = ast.parse(path.read_text())
            calls += [f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}()" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods
                      and isinstance(node.func.value, ast.Name) and node.func.value.id in ("trainer", "t", "Trainer")]
    assert not calls, calls
