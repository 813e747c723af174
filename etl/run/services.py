"""What a command opens before any work: the sources (their settings checked first), the store and the database."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from etl.config import Settings
from etl.db import Database
from etl.sources import Source, load_source_modules, source_class
from etl.store import ObjectStore, store_from_settings

if TYPE_CHECKING:
    from etl.run.runner import RunRequest


class Services(NamedTuple):
    """The database (migrated) and the object store (checked; None when the command needs none)."""

    db: Database
    store: ObjectStore | None


def source_classes(settings: Settings, names: Sequence[str]) -> list[type[Source]]:
    """The classes of the named sources, every one's settings checked: ConfigError before any work."""
    load_source_modules(settings.source_paths)
    classes = [source_class(name) for name in names]
    for cls in classes:
        cls.check_settings(settings)
    return classes


def build_sources(settings: Settings, request: RunRequest, *, db: Database | None = None) -> list[Source]:
    """Instantiate the requested sources after checking every one's settings; the one place sources are built,
    each handed at construction the piece of platform state it declares (`Source.state_type`, etl/db/platform.py)
    made from `db` (None: a dry run, a plan)."""
    return [
        cls(settings, state=cls.state_type(db) if db is not None and cls.state_type else None,
            **request.source_options.get(cls.name, {}))
        for cls in source_classes(settings, request.sources)
    ]  # fmt: skip


def open_services(
    settings: Settings, *, db: Database | None = None, store: ObjectStore | None = None, check_store: bool = True,
    on_new_archive: Callable[[], None] | None = None,
) -> Services:  # fmt: skip
    """The object store (checked) and the database (migrated), each failing with a ConfigError that names the
    setting (ServiceUnavailable when it cannot be reached): what every command opens before any work.
    `on_new_archive`: called before the migrations that create the archive, when the database holds none."""
    if check_store:
        store = store or store_from_settings(settings)
        store.check()
    db = db or Database.from_settings(settings)
    db.migrate(on_new=on_new_archive)
    return Services(db, store)
