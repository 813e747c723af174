"""The source registry: one module per platform, each registering its Source class by name.

A platform's module is named after its source (etl/sources/youtube.py registers `youtube`) and is imported
when that source is first asked for, so a run of one source does not import the others (issue 16); listing
the registry imports them all. Every module of this package is found without a hand-kept list; sources kept
elsewhere, one file each, are loaded from ETL_SOURCE_PATHS (README, "Adding a platform"). A source's module
declares its own settings (`SETTINGS`), which etl.config.load_settings collects from here.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from etl.config import Setting
from etl.errors import ConfigError, UsageError
from etl.sources.base import FetchWindow, Source

# The layers the platforms stand on, and twitter's compliance client: modules of this package, not platforms.
_SHARED = {"base", "api", "x_compliance"}


def _module_names(folder: str) -> set[str]:
    """The modules of a folder as pkgutil.iter_modules finds them: from source, from bytecode alone, or compiled."""
    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)  # ".cpython-311-...so" before ".so"
    names = set()
    for entry in os.scandir(folder):
        suffix = next((s for s in suffixes if entry.name.endswith(s)), None)
        if suffix is not None and entry.name[: -len(suffix)].isidentifier():
            names.add(entry.name[: -len(suffix)])
    return names


# Every platform of this package, by module name (= source name), found by listing the package's directory.
BUILT_IN = tuple(sorted(name for name in _module_names(__path__[0]) if not name.startswith("_") and name not in _SHARED))


class _Registry(dict):
    """name -> Source class. Asking for a built-in platform by name imports its module (which registers it);
    iterating, counting or listing the registry imports every built-in platform first, so its users see them all."""

    def _load(self, name: str) -> None:
        if name in BUILT_IN and not dict.__contains__(self, name):
            importlib.import_module(f"{__name__}.{name}")

    def __missing__(self, name: str) -> type[Source]:
        self._load(name)
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self._load(name)
        return dict.__contains__(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def load_all(self) -> None:
        for name in BUILT_IN:
            self._load(name)

    def __iter__(self) -> Iterator[str]:
        self.load_all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.load_all()
        return dict.__len__(self)

    def keys(self):  # type: ignore[override]
        self.load_all()
        return dict.keys(self)

    def values(self):  # type: ignore[override]
        self.load_all()
        return dict.values(self)

    def items(self):  # type: ignore[override]
        self.load_all()
        return dict.items(self)

    def copy(self) -> dict[str, type[Source]]:
        self.load_all()
        return dict(dict.items(self))

    def __repr__(self) -> str:
        self.load_all()
        return dict.__repr__(self)


REGISTRY: dict[str, type[Source]] = _Registry()


def register(cls: type[Source]) -> type[Source]:
    REGISTRY[cls.name] = cls
    return cls


def source_class(name: str) -> type[Source]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown source {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def source_names() -> list[str]:
    """The names of every source (as sorted(REGISTRY)), without importing the platforms not yet loaded."""
    return sorted(set(BUILT_IN) | set(dict.keys(REGISTRY)))


def _declared(cls: type[Source]) -> tuple[Setting, ...]:
    return tuple(getattr(sys.modules.get(cls.__module__), "SETTINGS", ()))


def declared_settings() -> dict[str, tuple[Setting, ...]]:
    """Each registered source's own settings, as its module declares them (`SETTINGS = (Setting(...), ...)`)."""
    return {name: _declared(cls) for name, cls in REGISTRY.items()}


def declared_settings_of(name: str) -> tuple[Setting, ...]:
    """declared_settings().get(name, ()), importing no other platform."""
    cls = REGISTRY.get(name)
    return _declared(cls) if cls is not None else ()


def settings_in_use(env: Mapping[str, str]) -> dict[str, tuple[Setting, ...]]:
    """declared_settings() of the sources whose settings `env` may hold: a built-in platform's settings are named
    after it (YOUTUBE_...), so one without a variable under its prefix is not imported. With a source from
    elsewhere registered (ETL_SOURCE_PATHS), every platform is imported, so a setting declared twice is still found."""
    if any(not cls.__module__.startswith(f"{__name__}.") for cls in dict.values(REGISTRY)):
        REGISTRY.load_all()  # type: ignore[attr-defined]
    named = {variable.upper() for variable in env}
    for name in BUILT_IN:
        if any(variable.startswith(f"{name.upper()}_") for variable in named):
            REGISTRY[name]  # noqa: B018 (imports its module)
    return {name: _declared(cls) for name, cls in dict.items(REGISTRY)}


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


__all__ = ["REGISTRY", "FetchWindow", "Source", "declared_settings", "load_source_modules", "register", "source_class", "source_names"]
