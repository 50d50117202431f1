"""Training methods: one module each, registered once, discovered on first use.

A method is a small object (`cocomix.methods.base.Method`) that declares the config sections it reads
(`reads`), the artifacts it needs (`artifacts(cfg)`: teacher, SAE, label cache), the model-side module
it adds to the backbone (`slot`, from `cocomix/slots.py`), and computes the loss of a micro-batch.
Everything else is the trainer's and the same for every method.

Adding a method is one file: put a module in `baselines/` (or `cocomix/methods/`) that defines a
`Method` subclass decorated with `@register`. `get_method`, the CLI, the DAG, the reports and MLflow
then know it by its `name`:

    from cocomix.methods.base import Method, register

    @register
    class MyMethod(Method):
        name = "my_method"
        def loss(self, model, batch): ...
"""

from __future__ import annotations

import importlib
import pkgutil

from cocomix.config import RUN_SECTIONS, Config, ConfigError, fingerprint
from cocomix.methods.base import ARTIFACTS, REGISTRY, Batch, Method, register

# Packages whose modules hold methods; each module is imported once, on the first lookup.
METHOD_PACKAGES = ("baselines", "cocomix.methods")


def _discover() -> None:
    for package_name in METHOD_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{package_name}.{info.name}")


def method_names() -> list[str]:
    _discover()
    return sorted(REGISTRY)


def get_method(name: str) -> Method:
    """A fresh instance of the method registered as `name`."""
    if name not in REGISTRY:
        _discover()
    if name not in REGISTRY:
        raise ConfigError(f"config key 'method': unknown method {name!r} (expected one of {sorted(REGISTRY)})")
    return REGISTRY[name]()


def run_fingerprint(cfg: Config, method: Method | None = None) -> str:
    """What a run's result depends on: the common sections plus those its method (`cfg.method`'s, or
    `method` when the caller has it) reads. Checkpoints carry it, so a run folder made with another
    config is superseded rather than resumed."""
    return fingerprint(cfg, RUN_SECTIONS + tuple((method or get_method(cfg.method)).reads))


__all__ = ["ARTIFACTS", "Batch", "Method", "get_method", "method_names", "register", "run_fingerprint"]
