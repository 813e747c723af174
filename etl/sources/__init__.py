"""The source registry: one module per platform, each registering its Source class by name.

Every module of this package is imported (and so registers its source) without a hand-kept list; sources
kept elsewhere, one file each, are loaded from ETL_SOURCE_PATHS (README, "Adding a platform").
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Sequence
from pathlib import Path

from etl.errors import ConfigError, UsageError
from etl.sources.base import FetchWindow, Source

REGISTRY: dict[str, type[Source]] = {}
_SHARED = {"base", "api"}  # the layers the platforms stand on, not platforms


def register(cls: type[Source]) -> type[Source]:
    REGISTRY[cls.name] = cls
    return cls


def source_class(name: str) -> type[Source]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown source {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def load_source_modules(paths: Sequence[str]) -> None:
    """Import extra source modules (a .py file, or an importable module name); each registers its source."""
    for entry in paths:
        try:
            if entry.endswith(".py"):
                path = Path(entry).expanduser().resolve()
                spec = importlib.util.spec_from_file_location(f"etl_source_{path.stem}", path)
                if spec is None or spec.loader is None or not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        except Exception as exc:
            raise ConfigError(f"ETL_SOURCE_PATHS: cannot load {entry!r}: {type(exc).__name__}: {exc}") from None


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "FetchWindow", "Source", "load_source_modules", "register", "source_class"]
