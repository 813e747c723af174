"""Modules imported on first use (issue 16, start-up): a run that sends no HTTP request, such as a rerun of a
file, never imports requests and urllib3 (about 45 ms), although every source module names them.

`from etl.lazy import requests` binds a stand-in: the first attribute read imports the module (under
importlib's lock, so threads may race to it), and every read is the module's own attribute."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module `name` until an attribute is read; then for the module itself."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:  # only called for names the stand-in does not have: all but two
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._module is not None else ''}>"


requests = LazyModule("requests")
urllib3 = LazyModule("urllib3")
