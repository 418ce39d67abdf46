"""Imports point down the layers of docs/architecture.md.

The import graph of the package is read with ``ast``, counting every import: at the
top of a module, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_wsgate"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:`` (they never run)."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                found.update(ast.walk(child))
    return found


def imports(*, at_run_time: bool = False) -> dict[str, set[str]]:
    """Every module of the package, with the modules it imports (package ones, and
    ``trio``); with ``at_run_time``, without the imports under ``TYPE_CHECKING``."""
    graph: dict[str, set[str]] = {}
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        skipped = type_checking_only(tree) if at_run_time else set()
        for node in ast.walk(tree):
            if node in skipped:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = node.module or ""
                if node.level:
                    target = f"{base}.{target}" if target else base
                # "from . import x" may name a module.
                found.add(target)
                found.update(
                    f"{target}.{alias.name}"
                    for alias in node.names
                    if f"{target}.{alias.name}" in modules
                )
        graph[name] = {
            target
            for target in found
            if target == "trio" or target.startswith("trio.") or target in modules
        }
        graph[name] = {"trio" if t.startswith("trio.") else t for t in graph[name]}
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_sans_io_layers_import_no_trio_and_nothing_above_them() -> None:
    # Imports under TYPE_CHECKING count (a type of a layer above is an arrow up), but
    # only what runs must be free of trio.
    graph, running = imports(), imports(at_run_time=True)
    pure = {"trio_wsgate.exceptions", "trio_wsgate.identity", "trio_wsgate.reliability"}
    sans_io = [name for name in graph if name.startswith("trio_wsgate.protocol")]
    sans_io += ["trio_wsgate.reliability"]
    for name in sans_io:
        assert "trio" not in reaches(running, name), name
        above = {
            target
            for target in reaches(graph, name)
            if not target.startswith("trio_wsgate.protocol") and target not in pure
        }
        assert not above, (name, above)
    # The session: the reliability state and the protocol, a broker's publication as a
    # type, and no trio when it runs.
    assert "trio" not in reaches(running, "trio_wsgate.session")
    assert graph["trio_wsgate.session"] - {"trio_wsgate.brokers.base"} <= pure | {
        name for name in graph if name.startswith("trio_wsgate.protocol")
    }


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    # The package's __init__ imports its public names from everywhere: it is the top,
    # not a layer.
    graph = {name: targets - {"trio_wsgate"} for name, targets in imports().items()}
    assert cycles(graph) == []


def test_the_transports_do_not_name_the_node_above_them() -> None:
    graph = imports()
    for name in graph:
        if name.startswith("trio_wsgate.transports"):
            above = {
                target
                for target in graph[name]
                if target.startswith("trio_wsgate.")
                and not target.startswith(("trio_wsgate.transports", "trio_wsgate.protocol"))
                and target
                not in ("trio_wsgate.wakeup", "trio_wsgate.readiness", "trio_wsgate.config")
            }
            assert not above, (name, above)


def _defined_here(tree: ast.Module) -> set[str]:
    """The names a module defines: functions, classes, attributes it assigns, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return names


def test_no_module_uses_another_modules_private_names() -> None:
    # A leading underscore says "this module's own": reaching into another module's
    # (``session._push``, ``server._asgi_app``) makes two modules one in disguise.
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        own = _defined_here(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [
                    f"{path.name}: imports {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr not in own
            ):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


#: The layers of docs/architecture.md, from the bottom: a module may import its own
#: layer and those before it, never one after. The plumbing (settings, metrics, the
#: timers) sits between the protocol, which needs none of it, and everything else.
LAYERS: list[tuple[str, set[str]]] = [
    ("protocol", {"protocol", "exceptions", "identity"}),
    (
        "plumbing",
        {"config", "limits", "listeners", "logs", "metrics", "wakeup", "readiness", "timers"},
    ),
    ("session", {"reliability", "session", "auth", "brokers.base"}),
    ("transports", {"transports"}),
    ("connection", {"connection", "dispatch", "heartbeat", "tokens", "welcome"}),
    ("hub", {"hub", "batching", "brokers"}),
    (
        "edges",
        {
            "server",
            "admin",
            "asgi_app",
            "files",
            "gateway",
            "cli",
            "client",
            "_client_cli",
            "testing",
            "workers",
            "__main__",
        },
    ),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of a module of the package (its longest listed prefix)."""
    name = module.removeprefix("trio_wsgate.")
    best: tuple[int, int] | None = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            listed = name == member or name.startswith(member + ".")
            if listed and (best is None or len(member) > best[0]):
                best = (len(member), index)
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[1]


def test_every_import_points_down_the_layers() -> None:
    graph = imports()
    upward = []
    for name, targets in graph.items():
        if name == "trio_wsgate":  # the package's __init__: the top, not a layer
            continue
        for target in targets - {"trio", "trio_wsgate"}:
            if layer_of(target) > layer_of(name):
                upward.append(
                    f"{name} ({LAYERS[layer_of(name)][0]}) imports "
                    f"{target} ({LAYERS[layer_of(target)][0]})"
                )
    assert upward == []


def test_the_layer_test_sees_an_upward_arrow() -> None:
    assert layer_of("trio_wsgate.brokers.base") < layer_of("trio_wsgate.connection")
    assert layer_of("trio_wsgate.brokers.redis") > layer_of("trio_wsgate.connection")
    assert layer_of("trio_wsgate.protocol.codecs") < layer_of("trio_wsgate.timers")
    assert layer_of("trio_wsgate.transports.asgi") < layer_of("trio_wsgate.welcome")
