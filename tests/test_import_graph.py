"""
The import graph of the ``regionspot`` package: no file imports itself back through other files
(module-level and function-level imports alike), and the layers point one way:
data <- modeling <- checkpoint / engine / evaluation / predictor.
"""
import ast
import os
from typing import Dict, List, Set

from conftest import REPO_ROOT

PACKAGE = "regionspot"
# package (or module) -> what it must not import
FORBIDDEN = {
    "regionspot.data": ("regionspot.modeling", "regionspot.engine", "regionspot.checkpoint", "regionspot.evaluation",
                        "regionspot.predictor"),
    "regionspot.modeling": ("regionspot.engine", "regionspot.checkpoint", "regionspot.evaluation",
                            "regionspot.predictor"),
}


def _modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of the package."""
    root = os.path.join(REPO_ROOT, PACKAGE)
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = os.path.relpath(path, REPO_ROOT)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: Dict[str, str]) -> str:
    """The module of the package that importing ``name`` runs (its longest known prefix)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports anywhere in the file (functions included)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        package = module.split(".") if is_package else module.split(".")[:-1]
        targets = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # "from pkg import sub" imports the submodule pkg.sub when there is one
                names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            for name in names:
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    target = _resolve(name, modules)
                    if target and target != module:
                        targets.add(target)
        graph[module] = targets
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[Set[str]] = []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats
            nxt = min(w for w in graph[path[-1]] if w in group)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_the_graph_sees_function_level_imports():
    # build_regionspot_train_loader imports the feature cache inside the function
    assert "regionspot.data.feature_cache" in import_graph()["regionspot.data.mappers"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in regionspot/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        for layer, forbidden in FORBIDDEN.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [f"{module} imports {t}" for t in sorted(targets) if t.startswith(forbidden)]
    assert not wrong, "; ".join(wrong)
