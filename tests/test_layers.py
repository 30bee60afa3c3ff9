"""The layers point one way: entry points (root scripts, scripts/, bench/) -> serving/, sharing/ -> tasks/ -> nanochat/ -> libraries.

Read from the source (ast), lazy imports inside functions included: no module
imports a layer above its own, no entry point serves another as a library, and
no modules import each other, directly or round a longer circle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_LAYERS = {"nanochat": 0, "tasks": 1, "serving": 2, "sharing": 2}
ENTRY = 3  # scripts/, bench/ and the root's .py files
# bench/rivals.py is the benches' own shared code: benches may import it, nothing else may
SHARED_ENTRY_PACKAGES = {"bench"}


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("nanochat/**/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("serving/*.py"), *ROOT.glob("sharing/*.py"),
             *ROOT.glob("scripts/*.py"),
             *ROOT.glob("bench/*.py"), *ROOT.glob("*.py")]
    modules = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def layer(module: str) -> int:
    return LIBRARY_LAYERS.get(module.split(".")[0], ENTRY)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, deps in graph.items():
        for dep in sorted(deps):
            same_package = module.split(".")[0] == dep.split(".")[0]
            if layer(dep) > layer(module):
                problems.append(f"{module} imports {dep}, a layer above it")
            elif layer(dep) == ENTRY and not (same_package and dep.split(".")[0] in SHARED_ENTRY_PACKAGES):
                problems.append(f"{module} uses the entry point {dep} as a library")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle once, found by depth-first search from each library module."""
    found, seen = [], set()
    def walk(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycle = path[path.index(dep):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [dep])
            elif len(path) < 12:
                walk(dep, path + [dep])
    for module in sorted(graph):
        if layer(module) < ENTRY:
            walk(module, [module])
    return found


def test_every_import_points_down_and_no_entry_point_is_a_library():
    problems = wrong_way(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_checks_see_what_they_are_meant_to_catch():
    graph = {"nanochat.a": {"tasks.b"}, "tasks.b": {"nanochat.c"}, "nanochat.c": {"nanochat.a"},
             "scripts.x": {"scripts.y", "bench.rivals"}, "bench.z": {"bench.rivals"}, "scripts.y": set()}
    problems = wrong_way(graph)
    assert "nanochat.a imports tasks.b, a layer above it" in problems
    assert "scripts.x uses the entry point scripts.y as a library" in problems
    assert "scripts.x uses the entry point bench.rivals as a library" in problems
    assert not any(p.startswith("bench.z") for p in problems)
    assert circles(graph) == [["nanochat.a", "tasks.b", "nanochat.c", "nanochat.a"]]
    assert "nanochat.dataset" in import_graph() and "nanochat.shards" in import_graph()["nanochat.dataset"]
    assert "serving.api_request" in import_graph()["serving.server"]


def test_the_core_package_stays_the_size_a_reader_can_hold():
    """The design card's flat core: model, data, optimizers, loop, checkpoints, engine, evaluation.
    Serving and sharing live beside it; a module that joins nanochat/ should be one of those jobs."""
    modules = [p for p in (ROOT / "nanochat").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 40, sorted(p.name for p in modules)


# ---------------------------------------------------------------- library code takes values

# the only functions of a package that may hold its module's argparse namespace
NAMESPACE_OWNERS = {"main", "parse_args", "_parse_args"}


def namespace_readers(source: str) -> list[str]:
    """Functions (outside NAMESPACE_OWNERS and what they enclose) that take a parameter named `args` or read `args.<name>`."""
    found = []

    def visit(node, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name in NAMESPACE_OWNERS:
                    continue
                named = [a.arg for a in child.args.posonlyargs + child.args.args + child.args.kwonlyargs]
                if "args" in named:
                    found.append(f"{child.name}:{child.lineno} takes args")
                visit(child, child.name)
            elif function and isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "args":
                found.append(f"{function}:{child.lineno} reads args.{child.attr}")
            else:
                visit(child, function)

    visit(ast.parse(source), None)
    return found


def test_library_functions_take_values_not_the_entry_points_namespace():
    """Entry points own their flags and pass values (or small dataclasses) down: no function in the packages
    but a module's own main()/parse_args() reads an argparse namespace, so a reader follows a value, not a bag."""
    found = [f"{path.relative_to(ROOT)}: {line}" for name, path in project_modules().items()
             if name.split(".")[0] in LIBRARY_LAYERS for line in namespace_readers(path.read_text())]
    assert not found, "\n".join(found)


def test_the_namespace_check_sees_what_it_is_meant_to_catch():
    source = ("def fit(model, args):\n    return args.batch\n"
              "def main(argv=None):\n    args = parse(argv)\n    return (lambda: args.x)()\n"
              "def helper(rest):\n    return args.device\n"
              "def varargs(*args):\n    return len(args)\n")
    assert namespace_readers(source) == ["fit:1 takes args", "fit:2 reads args.batch", "helper:7 reads args.device"]


# ---------------------------------------------------------------- size

LONG_FUNCTION = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in project_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= LONG_FUNCTION:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "\n".join(long)
