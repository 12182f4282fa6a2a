"""A table of named rows filled by the modules of a package as they are imported: the one
mechanism behind the op, family and target registries (qexport/ops, families, targets)."""
from __future__ import annotations

import importlib
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`package`'s `modules` each call `add(key, row)` at import; they are imported on the
    first read, so that importing the package stays light and a new row is one module plus
    its name in `modules`."""

    def __init__(self, package: str, modules: Iterable[str], what: str):
        self.package, self.modules, self.what = package, tuple(modules), what
        self._rows: dict[str, T] = {}
        self._loaded = False

    def add(self, key: str, row: T) -> T:
        if key in self._rows and self._rows[key] is not row:
            raise ValueError(f"{self.what} {key!r} registered twice")
        self._rows[key] = row
        return row

    def _load(self) -> dict[str, T]:
        """The rows, every module imported (an import error propagates, every time)."""
        if not self._loaded:
            for module in self.modules:
                importlib.import_module(f"{self.package}.{module}")
            self._loaded = True
        return self._rows

    def get(self, key: str, default: T | None = None) -> T | None:
        return self._load().get(key, default)

    def keys(self) -> list[str]:
        """Keys named like a module first, in the modules' order (however the modules were
        imported), then the others as registered."""
        rows = self._load()
        first = [m for m in self.modules if m in rows]
        return first + [k for k in rows if k not in first]

    def rows(self) -> list[T]:
        """Each distinct row once, in registration order."""
        return list({id(r): r for r in self._load().values()}.values())
