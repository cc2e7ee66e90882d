"""Name → implementation registries. The registry is the only switch between methods (no `if method ==`)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from .errors import SvdpressError

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named methods that imports its package's modules on first use.

    Each method lives in its own module and registers itself with `@REGISTRY.register("name")`, so adding a
    method is adding a file: nothing else changes.
    """

    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            pkg = importlib.import_module(self.package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{self.package}.{mod.name}")
            self._loaded = True

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __getitem__(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise SvdpressError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[name]
