"""The package's public names stay what `fastft.__all__` promises, whatever submodules were imported before."""

from __future__ import annotations

import importlib
import pkgutil
import types

import fastft


def test_public_names_are_not_shadowed_by_submodules() -> None:
    """Importing a submodule binds it as an attribute of the package: one named like an API function (the old
    `fastft/evaluate.py`) replaced `fastft.evaluate` after any run had imported it."""
    for info in pkgutil.walk_packages(fastft.__path__, "fastft."):
        if not info.name.endswith(".__main__"):  # runs a CLI (fastft, fastft.benchmark)
            importlib.import_module(info.name)
    for name in fastft.__all__:
        value = getattr(fastft, name)
        assert not isinstance(value, types.ModuleType), f"fastft.{name} is the module {value.__name__}"
        assert callable(value), name
    from fastft.api import evaluate, predict
    from fastft.train import finetune

    assert (fastft.evaluate, fastft.predict, fastft.finetune) == (evaluate, predict, finetune)
