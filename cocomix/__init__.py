"""CoCoMix reproduction harness.

`import cocomix` (or any submodule, e.g. `cocomix.config`) stays light: it imports neither torch nor
transformers, so the CLI reports a config typo in well under a second. The "cocomix" model type is
registered with transformers' Auto classes as soon as transformers is imported in this process
(or at once, if it already is), so `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works
after `import cocomix` whichever of the two came first.
"""

import importlib.abc
import sys


def _register() -> None:
    if "cocomix.model" in sys.modules:
        return  # being imported right now (it imports transformers): it registers itself when done
    import cocomix.model  # noqa: F401 (# lazy: pulls in torch; registers the model type on import)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """A post-import hook: lets the real finder load `transformers`, then registers our model type."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                _register()

            spec.loader.exec_module = exec_and_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())


def __getattr__(name):  # `from cocomix import CocomixForCausalLM` still works, lazily
    if name in ("CocomixConfig", "CocomixForCausalLM"):
        from cocomix import model  # lazy: torch

        return getattr(model, name)
    raise AttributeError(f"module 'cocomix' has no attribute {name!r}")


__all__ = ["CocomixConfig", "CocomixForCausalLM"]
