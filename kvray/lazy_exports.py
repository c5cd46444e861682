"""Names a package exports but imports only when first used, so that importing it loads no torch or Ray."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The package's `__getattr__` and `__dir__` for `exports` (name -> module that defines it): a name is
    imported at its first use and kept in `namespace` (the package's globals), so the next use is free."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
