"""The package's import structure: dependencies point one way, the CLI sits on
top and nothing imports it, the embedded registry knows nothing of the world, no import cycles.
Every import counts, including those inside functions. No module reads a global name it never
defines (a helper moved to another module fails here, not hours into a recipe). Budget: < 1 s."""

import ast
import builtins
import symtable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"gill_hf": ROOT / "gill_hf", "gill_hf.modeling": ROOT / "modeling", "gill_hf.pipelines": ROOT / "pipelines"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if package == "gill_hf" and path.is_relative_to(ROOT / "gill_hf" / "metrics") and path.parent.name != "metrics":
                continue  # evaluate metric scripts, loaded by path
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_nothing_imports_the_cli():
    importers = sorted(m for m, deps in _graph().items() if "gill_hf.cli" in deps and m != "gill_hf.world.__main__")
    assert importers == []


def test_modeling_imports_nothing_of_the_package_and_the_registry_nothing_of_the_world():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("gill_hf.modeling"):
            assert all(d.startswith("gill_hf.modeling") for d in deps), (name, deps)
    assert not [d for d in graph["gill_hf.embedded"] if d.startswith("gill_hf.world")]
    assert not [d for d in graph["gill_hf.world.eval_gill"] if d == "gill_hf.demo"]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.endswith(".__main__"):
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state and not node.endswith("__main__"):
            visit(node, [])
    # A package's __init__ re-exporting its submodules is not a cycle of behaviour.
    cycles = [c for c in cycles if not any(c[i + 1].startswith(c[i] + ".") for i in range(len(c) - 1))]
    assert cycles == []


def _undefined_globals(path: Path) -> set[str]:
    """Names a module reads as globals (at module level or from a function / class body) that it
    never binds: no assignment, import, def or class of that name, and not a builtin."""
    top = symtable.symtable(path.read_text(), str(path), "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    bound |= set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__path__", "__package__"}
    missing, tables = set(), [top]
    while tables:
        table = tables.pop()
        missing |= {s.get_name() for s in table.get_symbols()
                    if (table is top or s.is_global()) and s.is_referenced() and s.get_name() not in bound}
        tables += table.get_children()
    return missing


def test_no_module_reads_an_undefined_global(tmp_path):
    undefined = {name: missing for name, path in _modules().items() if (missing := _undefined_globals(path))}
    assert not undefined, undefined
    # The check sees a name read inside a function only (what a moved helper leaves behind).
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    return os.sep + moved_helper()\n")
    assert _undefined_globals(probe) == {"moved_helper"}
