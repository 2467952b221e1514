import importlib
import inspect
import pkgutil

import alq_core


def test_all_is_sorted_and_exactly_the_public_names():
    public = {n for n in vars(alq_core) if not n.startswith("_")}
    modules = {n for n, m in vars(alq_core).items() if inspect.ismodule(m)}
    assert alq_core.__all__ == sorted(alq_core.__all__)
    assert set(alq_core.__all__) == public - modules


def test_every_private_module_imports_without_side_effects():
    for info in pkgutil.iter_modules(alq_core.__path__):
        importlib.import_module(f"alq_core.{info.name}")


def test_public_callables_have_docstrings():
    missing = [n for n in alq_core.__all__ if callable(getattr(alq_core, n)) and not getattr(alq_core, n).__doc__]
    assert not missing, f"public callables without a docstring: {missing}"
