"""The house's shape, measured: which modules import a tracking backend, which read the checkpoint
layout, the longest modules, and the walk of a training run's arguments through the modules.

The walk: `cocomix train` (tiny NTP run, tracking off) under `sys.setprofile`, from the command line
to its first training step. Every call of a project function that receives the run's arguments
(an argparse Namespace or a Config) is one step of the walk; a step in the module of the step
before "stays", one into a module already left before "returns", one into a lower-layer module than
the one it came from goes "down", into a higher one "climbs". Per module: how many times the walk
entered it (first entry included). Writes benchmarks/results/architecture-<device>-<date>.json.

    python benchmarks/architecture.py
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.common import write_result  # noqa: E402
from conftest import tiny_overrides  # noqa: E402
from test_imports import layer_of, RANK  # noqa: E402
from test_seams import backend_uses, layout_uses, library_modules  # noqa: E402

PACKAGES = ("cocomix", "baselines", "evals")


def module_of(filename: str) -> str | None:
    path = Path(filename).resolve()
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in PACKAGES or rel.suffix != ".py":
        return None
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def walk_of_train(argv: list[str]) -> list[tuple[str, str]]:
    """(module, function) of every project call that receives the run's arguments, in call order,
    until the first training step (and every call of `get_method`, which receives only a name)."""
    from cocomix import cli
    from cocomix.config import Config

    walk: list[tuple[str, str]] = []

    class FirstStep(Exception):
        pass

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "train_step":
            raise FirstStep
        module = module_of(code.co_filename)
        if module is None:
            return
        if code.co_name == "get_method":
            walk.append((module, "get_method"))
            return
        args = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if any(isinstance(a, (Config, argparse.Namespace)) for a in args):
            walk.append((module, code.co_qualname))

    sys.setprofile(profile)
    try:
        cli.main(argv)
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
    return walk


def walk_counts(walk: list[tuple[str, str]]) -> dict:
    stays = returns = climbs = 0
    entries: Counter = Counter()
    left: set[str] = set()
    prev = None
    for module, _ in walk:
        if module == prev:
            stays += 1
            continue
        entries[module] += 1
        if module in left:
            returns += 1
        if prev is not None:
            left.add(prev)
            if RANK[layer_of(module)] > RANK[layer_of(prev)]:
                climbs += 1
        prev = module
    calls = Counter(f"{m}.{f}" for m, f in walk)
    return {"steps": len(walk), "stays": stays, "returns": returns, "climbs": climbs,
            "entries_per_module": dict(entries.most_common()), "most_entered": entries.most_common(1)[0],
            "get_method_calls": calls.get("cocomix.methods.get_method", 0),
            "sequence": [f"{m}.{f}" for m, f in walk]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    out = ap.parse_args().out

    modules = list(library_modules())
    importing = sorted({use.split(":")[0] for name, tree in modules for use in backend_uses(name, tree)
                        if " imports " in use})
    layout = sorted({use.split(":")[0] for name, tree in modules for use in layout_uses(name, tree)})
    readers = sorted(name for name, tree in modules for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module == "cocomix.checkpoints"
                     or isinstance(node, ast.ImportFrom) and node.module == "cocomix"
                     and any(a.name == "checkpoints" for a in node.names))
    lengths = sorted(((len((ROOT / name).read_text().splitlines()), name) for name, _ in modules), reverse=True)

    from cocomix.config import load_config
    from cocomix.data.shards import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = tiny_overrides(root, root / "data", "tracking.enabled=false", "method=ntp")
        prepare_data(load_config(ROOT / "config/tiny.yaml", overrides), progress=False)
        walk = walk_of_train(["train", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress", *overrides])
    body = {"modules_importing_a_tracking_backend": importing,
            "modules_naming_the_checkpoint_layout": layout,
            "modules_importing_cocomix.checkpoints": sorted(set(readers)),
            "longest_modules": [{"lines": n, "module": m} for n, m in lengths[:5]],
            "train_argument_walk": walk_counts(walk)}
    for key, value in body.items():
        print(f"{key}: {value}")
    write_result("architecture", body, out)


if __name__ == "__main__":
    main()
