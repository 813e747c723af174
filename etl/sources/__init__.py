"""The source registry: one module per platform, each registering its Source class by name.

Every module of this package is imported (and so registers its source) without a hand-kept list; sources
kept elsewhere, one file each, are loaded from ETL_SOURCE_PATHS (README, "Adding a platform"). A source's
module declares its own settings (`SETTINGS`), which etl.config.load_settings collects from here.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

from etl.config import Setting
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


def declared_settings() -> dict[str, tuple[Setting, ...]]:
    """Each registered source's own settings, as its module declares them (`SETTINGS = (Setting(...), ...)`)."""
    return {name: tuple(getattr(sys.modules.get(cls.__module__), "SETTINGS", ())) for name, cls in REGISTRY.items()}


def load_source_modules(paths: Sequence[str]) -> None:
    """Import extra source modules (a .py file, or an importable module name); each registers its source.

    A file is loaded once per process, as a module of its own in sys.modules (where its SETTINGS are found)."""
    for entry in paths:
        try:
            if entry.endswith(".py"):
                path = Path(entry).expanduser().resolve()
                spec = importlib.util.spec_from_file_location(f"etl_source_{path.stem}", path)
                if spec is None or spec.loader is None or not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                loaded = sys.modules.get(spec.name)
                if loaded is not None and getattr(loaded, "__file__", None) == str(path):
                    continue
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[spec.name]
                    raise
            else:
                importlib.import_module(entry)
        except Exception as exc:
            raise ConfigError(f"ETL_SOURCE_PATHS: cannot load {entry!r}: {type(exc).__name__}: {exc}") from None


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "FetchWindow", "Source", "declared_settings", "load_source_modules", "register", "source_class"]
