"""The package's modules import each other without a circle (read from the source: every import, relative ones,
those inside functions and those under ``if TYPE_CHECKING:`` included), and none is much over 300 lines."""
import ast
import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_flare"
NAME = PACKAGE.name
MAX_LINES = 320  # "no module over ~300 lines"

# Each entry: the sorted module set of one tolerated circle (none is). The test warns about stale entries.
ALLOWED_CYCLES: list[tuple[str, ...]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``module`` imports, with the packages above them that Python imports first (except
    the importing module's own ancestors, which are being imported already)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets |= {f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known}
    found = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and every package above it
            name = ".".join(parts[:i])
            if name in known and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(m, p, set(modules)) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted tuple."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _path_in(component: tuple[str, ...], graph: dict[str, set[str]]) -> list[str]:
    """One circle through the component, for the message."""
    start, members = component[0], set(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        unvisited = [w for w in nxt if w not in seen]
        if not unvisited:
            return path + [nxt[0]] if nxt else path
        path.append(unvisited[0])
        seen.add(unvisited[0])


def test_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert f"{NAME}.checkpoint" in graph[f"{NAME}.export"]  # from .checkpoint import ... (relative)
    assert f"{NAME}.network" in graph[f"{NAME}.checkpoint"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    new = [c for c in found if c not in ALLOWED_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(" -> ".join(_path_in(c, graph)) for c in new)
    stale = [c for c in ALLOWED_CYCLES if c not in found]
    if stale:
        warnings.warn(f"ALLOWED_CYCLES entries that no longer occur (remove them): {stale}", stacklevel=1)


def test_checkpoint_and_converters_do_not_import_each_other():
    graph = import_graph()
    assert f"{NAME}.convert_nnunet" not in graph[f"{NAME}.export"]
    assert f"{NAME}.export" not in graph[f"{NAME}.convert_nnunet"]


def test_modules_are_short():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
