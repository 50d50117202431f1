"""The import direction of the package, read from the source (AST): every project module imports
only its own layer or lower ones, function-local imports of project modules say why they are lazy,
and `import cocomix.config` pulls in neither torch nor transformers; no library module is over 650 lines.

    config -> data -> model -> methods -> trainer -> evals and reports -> DAG, sweeps, CLI
"""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS = {
    "base": ["cocomix.files", "cocomix.gpus", "cocomix.faults", "cocomix.progress", "cocomix.records"],
    "config": ["cocomix.config"],
    "data": ["cocomix.data", "cocomix.checkpoints", "cocomix.tracking"],
    "model": ["cocomix.model", "cocomix.slots", "cocomix.flops", "cocomix.params", "cocomix.device",
              "cocomix.teacher", "cocomix.hf_teacher", "cocomix.sae", "cocomix.saelens", "cocomix.concepts", "cocomix.diagnostics", "cocomix.parallel"],
    "methods": ["cocomix.methods", "cocomix.plan", "cocomix.compute", "baselines"],
    "trainer": ["cocomix.trainer", "cocomix.callbacks"],
    "evals": ["evals", "cocomix.interpret", "cocomix.steering", "cocomix.export"],
    "top": ["cocomix.launch", "cocomix.dag", "cocomix.sweep", "cocomix.tune", "cocomix.cli", "cocomix.reference", "cocomix.__main__",
            "cocomix"],  # the package's __init__: registers the model type once transformers is imported
}
RANK = {name: i for i, name in enumerate(LAYERS)}
PACKAGES = ("cocomix", "baselines", "evals")


def layer_of(module: str) -> str:
    best = max((p for ps in LAYERS.values() for p in ps if module == p or module.startswith(p + ".")),
               key=len, default=None)
    if best is None:
        raise AssertionError(f"{module}: not in any layer of tests/test_imports.py (add it)")
    return next(name for name, ps in LAYERS.items() if best in ps)


def project_imports(module: str, source: str, is_package: bool = False):
    """(imported module, line number, function-local?, source line) for every project import."""
    tree = ast.parse(source)
    lines = source.splitlines()
    package = module if is_package else module.rpartition(".")[0]
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name, node.lineno, id(node) in local, lines[node.lineno - 1]


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    found = []
    for imported, lineno, is_local, line in project_imports(module, source, is_package):
        if RANK[layer_of(imported)] > RANK[layer_of(module)]:
            found.append(f"{module}:{lineno} imports {imported} ({layer_of(module)} -> {layer_of(imported)}: upward)")
        if is_local and "# lazy:" not in line:
            found.append(f"{module}:{lineno} imports {imported} inside a function without a '# lazy:' reason")
    return found


def project_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            yield ".".join(parts[:-1] if is_package else parts), path, is_package


def test_every_import_points_down_the_layers():
    found = [v for module, path, is_package in project_modules()
             for v in violations(module, path.read_text(), is_package)]
    assert not found, "\n".join(found)


def test_the_check_catches_an_upward_import_and_an_unexplained_lazy_one():
    assert violations("cocomix.config", "from cocomix.trainer import Trainer\n") == [
        "cocomix.config:1 imports cocomix.trainer (config -> trainer: upward)"]
    assert violations("cocomix.model", "import torch\nfrom .slots import SLOTS\n") == []  # relative, same layer
    lazy = "def f():\n    from cocomix.data import DataError\n"
    assert violations("cocomix.trainer", lazy) == [
        "cocomix.trainer:2 imports cocomix.data inside a function without a '# lazy:' reason"]
    assert violations("cocomix.trainer", lazy.replace("DataError", "DataError  # lazy: optional")) == []


def test_no_import_cycles_between_project_modules():
    graph = {}
    for module, path, is_package in project_modules():
        graph[module] = {m for m, *_ in project_imports(module, path.read_text(), is_package) if m != module}

    def visit(node, stack, done):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done or node not in graph:
            return None
        done.add(node)
        for child in sorted(graph[node]):
            cycle = visit(child, stack + [node], done)
            if cycle:
                return cycle
        return None

    done: set = set()
    for module in sorted(graph):
        cycle = visit(module, [], done)
        assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", ["cocomix.config", "cocomix", "cocomix.files", "cocomix.checkpoints",
                                    "cocomix.tracking", "cocomix.sweep"])  # the Snakefile imports the sweep
def test_light_modules_import_neither_torch_nor_transformers(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


MAX_MODULE_LINES = 650
LONG_ALLOWED = {"cocomix/config.py"}  # the documented config schema: one dataclass per section, in one place


def test_no_library_module_is_over_650_lines():
    """A module past ~650 lines does several jobs: split it into a package by job (as evals/report/)."""
    long = [f"{path.relative_to(ROOT)}: {n} lines" for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))
            if str(path.relative_to(ROOT)) not in LONG_ALLOWED
            and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"over {MAX_MODULE_LINES} lines: " + ", ".join(long)
