"""The package's layering (DESIGN: arrows point down only), checked on the source: no
module imports from a layer above its own, including imports inside functions. And no
function is longer than the package allows without saying why."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fedjax_sim")

# Bottom to top. A module may import its own layer and the layers below it.
LAYERS = ["errors", "trees", "data", "models", "engine", "privacy", "aggregators", "attacks", "algorithms",
          "registry", "simulation", "cli"]
# The package's own entry points sit above everything (`tracking` gathers the trackers'
# public names from simulation.tracking).
TOP = {"__init__", "__main__", "tracking"}
# A function may be this long; longer ones say why in a comment on their `def` line's
# preceding line starting with "# long:".
MAX_FUNCTION_LINES = 120


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE)[:-3].split(os.sep), path


def _layer(parts: list[str]) -> int | None:
    if parts[0] in TOP:
        return len(LAYERS)
    return LAYERS.index(parts[0]) if parts[0] in LAYERS else None


def _imported(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module == "fedjax_sim":
            for alias in node.names:  # `from fedjax_sim import data`: the submodule
                yield node.lineno, f"fedjax_sim.{alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_every_module_has_a_layer():
    unplaced = ["/".join(parts) for parts, _ in _modules() if _layer(parts) is None]
    assert not unplaced, f"modules outside the known layers: {unplaced}"


def test_no_module_imports_from_a_layer_above_it():
    violations = []
    for parts, path in _modules():
        own = _layer(parts)
        for line, module in _imported(ast.parse(open(path).read())):
            if module != "fedjax_sim" and not module.startswith("fedjax_sim."):
                continue
            target = module.split(".")[1:] or ["__init__"]
            if _layer(target) is not None and _layer(target) > own:
                violations.append(f"{'/'.join(parts)}.py:{line} imports {module}")
    assert not violations, "imports from a layer above:\n" + "\n".join(violations)


def test_the_engine_imports_nothing_above_it():
    # The contract module in particular: algorithms and aggregators implement it.
    engine = LAYERS.index("engine")
    for parts, path in _modules():
        if parts[0] != "engine":
            continue
        for _, module in _imported(ast.parse(open(path).read())):
            if module.startswith("fedjax_sim."):
                assert _layer(module.split(".")[1:]) <= engine, f"{parts} imports {module}"


def test_functions_are_short_or_say_why():
    long = []
    for parts, path in _modules():
        source = open(path).read().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                reason = source[first - 2].strip().startswith("# long:") if first >= 2 else False
                if length > MAX_FUNCTION_LINES and not reason:
                    long.append(f"{'/'.join(parts)}.py:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over the length limit without a reason:\n" + "\n".join(long)


@pytest.mark.parametrize("name", ["simulate"])
def test_the_run_loop_is_short(name):
    tree = ast.parse(open(os.path.join(PACKAGE, "simulation", "loop.py")).read())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    assert fn.end_lineno - fn.lineno + 1 <= 110
