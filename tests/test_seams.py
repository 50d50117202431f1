"""The two seams every feature leans on, read from the source (AST): only cocomix/tracking.py talks to a
tracking backend (imports mlflow or wandb, names their tags or run-id files, checks whether tracking
is on), and only cocomix/checkpoints.py knows the checkpoint layout (its folder and file names)."""

import ast

import pytest

from conftest import ROOT

LIBRARY = ("cocomix", "baselines", "evals")
BACKENDS = ("mlflow", "wandb")
# The checkpoint layout: a run's checkpoints folder, a checkpoint's record, its trainer folder and files.
LAYOUT = ("checkpoint.json", "trainer_state.pt", "optimizer.pt")
LAYOUT_NAMES = ("checkpoints", "trainer")


def library_modules():
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def _not_names(tree) -> set[int]:
    """Docstrings, and the keys of dict displays (a JSON record's field names)."""
    skip = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return skip | {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k is not None}


def code_strings(tree):
    """(line, text) of every string constant that is not a docstring or a dict key and holds no
    whitespace: names and paths, not prose (an error message may mention checkpoint.json)."""
    skip = _not_names(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                and node.value and not any(c.isspace() for c in node.value)):
            yield node.lineno, node.value


def backend_uses(name: str, tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if a.name.split(".")[0] in BACKENDS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BACKENDS and not node.level:
            found.append(f"{name}:{node.lineno} imports from {node.module}")
        elif (isinstance(node, ast.Attribute) and node.attr in ("enabled", "backend")
              and isinstance(node.value, ast.Attribute) and node.value.attr == "tracking"):
            found.append(f"{name}:{node.lineno} reads tracking.{node.attr} (ask the tracker instead)")
    found += [f"{name}:{line} names {text!r}" for line, text in code_strings(tree)
              if any(b in text.lower() for b in BACKENDS)]
    return found


def layout_uses(name: str, tree) -> list[str]:
    return [f"{name}:{line} names {text!r}" for line, text in code_strings(tree)
            if any(part in LAYOUT_NAMES or part.startswith("step_") or any(f in part for f in LAYOUT)
                   for part in text.split("/"))]


# The config schema offers the backends by name; every run's environment.json records their versions.
EXEMPT = {("cocomix/records.py", "names 'mlflow'"), ("cocomix/records.py", "names 'wandb'")}


def test_only_the_tracking_module_talks_to_a_tracking_backend():
    found = [use for name, tree in library_modules() if name not in ("cocomix/tracking.py", "cocomix/config.py")
             for use in backend_uses(name, tree) if (name, use.split(" ", 1)[1]) not in EXEMPT]
    assert not found, "\n".join(found)


def test_only_the_checkpoints_module_knows_the_checkpoint_layout():
    found = [use for name, tree in library_modules() if name != "cocomix/checkpoints.py"
             for use in layout_uses(name, tree)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("import mlflow\n", ["m.py:1 imports mlflow"]),
    ("from wandb.proto import x\n", ["m.py:1 imports from wandb.proto"]),
    ("def f(cfg):\n    return cfg.tracking.enabled\n", ["m.py:2 reads tracking.enabled (ask the tracker instead)"]),
    ("TAG = 'mlflow.parentRunId'\n", ["m.py:1 names 'mlflow.parentRunId'"]),
    ("'''Logs to MLflow.'''\nMSG = 'sent to MLflow'\n", []),  # prose: a docstring, a message
])
def test_the_tracking_check_catches_what_it_says(source, expected):
    assert backend_uses("m.py", ast.parse(source)) == expected


@pytest.mark.parametrize("source, expected", [
    ("p = run / 'checkpoints' / 'step_0000010'\n", ["m.py:1 names 'checkpoints'", "m.py:1 names 'step_0000010'"]),
    ("GLOB = 'checkpoints/*/eval.json'\n", ["m.py:1 names 'checkpoints/*/eval.json'"]),
    ("f = ckpt / 'trainer' / 'optimizer.pt'\n", ["m.py:1 names 'trainer'", "m.py:1 names 'optimizer.pt'"]),
    ("raise X(f'{p}: checkpoint.json unreadable')\n", []),  # a message naming the file, not a path
    ("import trainer_utils\nname = 'trainer_stats'\n", []),
])
def test_the_layout_check_catches_what_it_says(source, expected):
    assert sorted(layout_uses("m.py", ast.parse(source))) == sorted(expected)
