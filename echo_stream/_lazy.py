"""A module proxy imported on first attribute access (keeps heavy imports off light code paths)."""
from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule(ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self._lazy_name = name
        self._lazy_mod = None

    def __getattr__(self, attr):
        if attr.startswith("_lazy"):
            raise AttributeError(attr)
        if self._lazy_mod is None:
            self._lazy_mod = importlib.import_module(self._lazy_name)
        return getattr(self._lazy_mod, attr)
