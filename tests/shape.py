"""Measure the shape of hpcbridge/ against issue 17's targets (an AST count).

Run it as a script for a report: ``python tests/shape.py [--json]``; tests/unit/test_shape.py
asserts the same numbers.
"""

from __future__ import annotations

import ast
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hpcbridge"

MAX_FUNCTION = 60
MAX_MEDIAN = 10
MAX_CLASS = 300
MAX_MODULE = 500
MAX_SCHEDULER = 200
SCHEDULER_MODULES = ("schedulers/pbs.py", "schedulers/slurm.py")
# Only these may import the sandbox: the sandbox itself and the command line that starts it.
SANDBOX_IMPORTERS = ("sandbox/", "cli/")


@dataclass
class Shape:
    functions: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)
    imports: dict[str, set[str]] = field(default_factory=dict)

    def long_functions(self) -> dict[str, int]:
        return {k: v for k, v in self.functions.items() if v > MAX_FUNCTION}

    def big_classes(self) -> dict[str, int]:
        return {k: v for k, v in self.classes.items() if v > MAX_CLASS}

    def big_modules(self) -> dict[str, int]:
        big = {k: v for k, v in self.modules.items() if v > MAX_MODULE}
        big.update(
            {k: v for k, v in self.modules.items() if k in SCHEDULER_MODULES and v > MAX_SCHEDULER}
        )
        return big

    def median(self) -> float:
        return statistics.median(self.functions.values())

    def sandbox_imports(self) -> list[str]:
        return sorted(
            mod
            for mod, deps in self.imports.items()
            if not _rel(mod).startswith(SANDBOX_IMPORTERS)
            and any(d == "hpcbridge.sandbox" or d.startswith("hpcbridge.sandbox.") for d in deps)
        )

    def cycles(self) -> list[list[str]]:
        return _cycles(self.imports)

    def total(self) -> int:
        return sum(self.modules.values())


def _rel(module: str) -> str:
    parts = module.split(".")[1:]
    return "/".join(parts) + ("/" if module in _PACKAGES else ".py")


_PACKAGES: set[str] = set()


def _span(node: ast.AST) -> int:
    # From the def line, not the first decorator: click option stacks do not count.
    return int(node.end_lineno or node.lineno) - int(node.lineno) + 1  # type: ignore[attr-defined]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
        _PACKAGES.add(".".join(parts))
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):  # function-local imports count too
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hpcbridge"))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if not target.startswith("hpcbridge"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {f for f in found if f != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def measure(root: Path = ROOT) -> Shape:
    shape = Shape()
    files = sorted(root.rglob("*.py"))
    names = {_module_name(p): p for p in files}
    known = set(names)
    for module, path in names.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        rel = str(path.relative_to(root))
        shape.modules[rel] = len(text.splitlines())
        shape.imports[module] = _imports(module, path.name == "__init__.py", tree, known)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                shape.functions[f"{rel}:{node.lineno}:{node.name}"] = _span(node)
            elif isinstance(node, ast.ClassDef):
                shape.classes[f"{rel}:{node.lineno}:{node.name}"] = _span(node)
    return shape


def report(shape: Shape) -> dict[str, object]:
    return {
        "total_lines": shape.total(),
        "functions": len(shape.functions),
        "median_function": shape.median(),
        "long_functions": shape.long_functions(),
        "big_classes": shape.big_classes(),
        "big_modules": shape.big_modules(),
        "import_cycles": shape.cycles(),
        "sandbox_imports": shape.sandbox_imports(),
    }


def main(argv: list[str]) -> int:
    data = report(measure())
    if "--json" in argv:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"total lines {data['total_lines']}, {data['functions']} functions, "
        f"median {data['median_function']} lines (target <= {MAX_MEDIAN})"
    )
    for key, limit in (
        ("long_functions", MAX_FUNCTION),
        ("big_classes", MAX_CLASS),
        ("big_modules", MAX_MODULE),
    ):
        items = data[key]
        assert isinstance(items, dict)
        print(f"{key} (limit {limit}): {len(items)}")
        for name, n in sorted(items.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {name}")
    cycles = data["import_cycles"]
    assert isinstance(cycles, list)
    print(f"import cycles: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"sandbox imported outside sandbox/ and cli/: {data['sandbox_imports']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
