"""Each package exports its public names through ``__init__`` with a sorted ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["bus", "workers", "schemas"]


def _isort_key(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions: the order ruff's RUF022 keeps."""
    if name.isupper():
        return (0, name)
    return (1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_unique_and_resolves(package: str) -> None:
    mod = importlib.import_module(package)
    names = list(mod.__all__)
    assert names == sorted(names, key=_isort_key), f"{package}.__all__ is not sorted"
    assert len(names) == len(set(names)), f"{package}.__all__ has duplicates"
    for name in names:
        assert hasattr(mod, name), f"{package}.{name} is listed but missing"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_all_is_exported(package: str) -> None:
    mod = importlib.import_module(package)
    exported = set(mod.__all__)
    for info in pkgutil.iter_modules(mod.__path__):
        if info.name.startswith("_") or info.name in ("testing", "cli", "__main__"):
            continue
        if info.name.startswith(("cli_", "demo")):  # the command line's parts, not the library
            continue
        sub = importlib.import_module(f"{package}.{info.name}")
        missing = sorted(set(getattr(sub, "__all__", ())) - exported)
        assert not missing, f"{package}.{info.name} names not exported from {package}: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package: str) -> None:
    mod = importlib.import_module(package)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if isinstance(obj, type) or callable(obj):
            assert (obj.__doc__ or "").strip(), f"{package}.{name} has no docstring"
