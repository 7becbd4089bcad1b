"""The package's shape, checked from its source with `ast` (nothing is imported):

- no module over 400 lines, no function (method, nested function) over 80 lines, except the
  declarative `default_config` table;
- no function body imports a `tooln1_jax` module: a dependency is visible at the top of its module;
- no import cycle among `tooln1_jax` modules (module-level imports, a package `__init__` standing
  for its package; imports under `if TYPE_CHECKING:` do not run, so they do not count);
- imports point up the data flow (`LAYERS`): no module imports a later stage.

Each failure names file:line and the rule.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "tooln1_jax"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
# (file, function): declarative tables, long by nature.
LONG_FUNCTION_ALLOWED = {("tooln1_jax/config.py", "default_config")}

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[pathlib.Path, ast.Module]]:
    """{module name: (path, tree)} for every .py file of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


SOURCES = _sources()


def _where(path: pathlib.Path, line: int) -> str:
    return f"{path.relative_to(ROOT).as_posix()}:{line}"


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The package modules an import statement in `module` names (a name imported from a package
    counts as that submodule when one exists, else as the package itself)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    if base.split(".")[0] != PACKAGE:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _module_level_imports(tree: ast.AST):
    """Import statements that run when the module is imported: not inside a function body, not
    under `if TYPE_CHECKING:` (class bodies and module-level if / try do run)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif not isinstance(child, FUNCTIONS + (ast.Lambda,)) and not _is_type_checking(child):
            yield from _module_level_imports(child)


def test_no_module_is_over_400_lines():
    problems = []
    for path, _ in SOURCES.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            problems.append(f"{_where(path, 1)}: {n} lines (rule: a module has at most {MAX_FILE_LINES} lines)")
    assert not problems, "\n".join(problems)


def test_no_function_is_over_80_lines():
    problems = []
    for path, tree in SOURCES.values():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, FUNCTIONS) or (rel, node.name) in LONG_FUNCTION_ALLOWED:
                continue
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                problems.append(
                    f"{_where(path, node.lineno)}: {node.name} is {n} lines "
                    f"(rule: a function has at most {MAX_FUNCTION_LINES} lines)"
                )
    assert not problems, "\n".join(problems)


def _imports_in_functions(node: ast.AST, function: str | None = None):
    """(innermost enclosing function name, import statement) for every import in a function body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)) and function is not None:
            yield function, child
        yield from _imports_in_functions(child, child.name if isinstance(child, FUNCTIONS) else function)


def test_no_function_imports_a_package_module():
    problems = []
    for module, (path, tree) in SOURCES.items():
        for function, node in _imports_in_functions(tree):
            names = _imported_modules(node, module, path.name == "__init__.py")
            if names:
                problems.append(
                    f"{_where(path, node.lineno)}: {function} imports {', '.join(sorted(set(names)))} "
                    "(rule: package modules are imported at module level, not in a function body)"
                )
    assert not problems, "\n".join(problems)


def _import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported module: line of the first import}} from module-level imports."""
    graph: dict[str, dict[str, int]] = {}
    for module, (path, tree) in SOURCES.items():
        edges = graph.setdefault(module, {})
        for node in _module_level_imports(tree):
            for target in _imported_modules(node, module, path.name == "__init__.py"):
                if target != module and target in SOURCES:
                    edges.setdefault(target, node.lineno)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed chain of modules) per strongly connected component with one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a few dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # Breadth-first from `start` inside the component, back to `start`: a shortest cycle.
        parent: dict[str, str] = {}
        frontier, end = [start], None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        chain = [end]
        while chain[-1] != start:
            chain.append(parent[chain[-1]])
        cycles.append([*reversed(chain), start])
    return cycles


def test_no_import_cycle():
    graph = _import_graph()
    problems = []
    for chain in _cycles(graph):
        first, second = chain[0], chain[1]
        steps = ", ".join(f"{a} -> {b} at {_where(SOURCES[a][0], graph[a][b])}" for a, b in zip(chain, chain[1:]))
        problems.append(
            f"{_where(SOURCES[first][0], graph[first][second])}: import cycle {' -> '.join(chain)} "
            f"(rule: module-level imports among package modules point one way; {steps})"
        )
    assert not problems, "\n".join(problems)


def test_the_cycle_finder_finds_a_cycle():
    """The checker itself: a made-up three-module cycle is reported as its chain."""
    graph = {"p.a": {"p.b": 1}, "p.b": {"p.c": 1}, "p.c": {"p.a": 1, "p.d": 1}, "p.d": {}}
    assert _cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert _cycles({"p.a": {"p.b": 1}, "p.b": {}}) == []


# The data flow, top to bottom (docs/CONTRIBUTING.md and the README's module table say the same):
# a module imports only from its own layer or the layers above it, never from a later stage.
LAYERS = (
    ("settings", "distributed", "interrupt", "assets"),
    ("config",),
    ("data",),
    ("sharding",),
    ("models",),
    ("token_draw", "sampling"),
    ("rewards",),
    ("rollouts",),
    ("grpo",),
    ("optimizer", "train_step"),
    ("bucketed_update",),
    ("checkpoint", "metrics"),
    ("cli",),
    ("run_setup", "resume"),
    ("sft",),
    ("iteration",),
    ("train",),
    ("evaluation", "evaluate", "export"),
)


def _layer(module: str) -> int | None:
    """The layer of a package module (a subpackage's modules share its layer); None for the package."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    matches = [i for i, names in enumerate(LAYERS) if parts[1] in names]
    assert matches, f"{module} is in no layer of LAYERS: add it where it sits in the data flow"
    return matches[0]


def test_imports_point_up_the_data_flow():
    problems = []
    for module, imports in _import_graph().items():
        for imported, line in imports.items():
            here, there = _layer(module), _layer(imported)
            if here is not None and there is not None and there > here:
                problems.append(
                    f"{_where(SOURCES[module][0], line)}: {module} imports {imported}, a later stage "
                    f"({LAYERS[there][0]} after {LAYERS[here][0]}) (rule: imports point up the data flow)"
                )
    assert not problems, "\n".join(problems)
