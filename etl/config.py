"""Reads the environment (and .env) once into a frozen Settings object; nothing else reads os.environ.

The core settings are declared here; each source declares its own beside its code (`SETTINGS` in its module),
and load_settings collects those from every registered source, ETL_SOURCE_PATHS plugins included.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from etl.errors import ConfigError


class Secret(str):
    """A string that never shows itself in repr() or logs; use .reveal() where the value is needed."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def reveal(self) -> str:
        return str.__str__(self)


def _userinfo(url: str) -> tuple[str, str, str | None, str] | None:
    """(scheme, user, password or None, the rest after the "@") of a URL with a user, split as libpq splits it: the
    user ends at the first "@" before any "/", whatever comes before it ("#" and "?" too, which urlsplit takes
    for the end of the host: a password holding one was not found, and so shown)."""
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    if not sep or "@" not in authority:
        return None
    userinfo = authority.split("@", 1)[0]
    user, colon, password = userinfo.partition(":")
    after = rest[len(userinfo) + 1 :]
    return scheme, user, password if colon else None, after


_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&]*)")  # libpq also takes a password as a URI parameter


def mask_url_password(url: str) -> str:
    """postgresql://user:pw@host/db -> postgresql://user:***@host/db, and ?password=pw -> ?password=*** (for
    messages and logs)."""
    parts = _userinfo(url)
    if parts is not None and parts[2] is not None:
        scheme, user, _, after = parts
        url = f"{scheme}://{user}:***@{after}"
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + "***", url)


def url_password(url: str) -> list[str]:
    """The passwords inside a URL, as written and percent-decoded (either may reach a message); [] if none."""
    parts = _userinfo(url)
    found = [parts[2]] if parts is not None and parts[2] else []
    found += [m.group(2) for m in _QUERY_PASSWORD.finditer(url) if m.group(2)]
    return list(dict.fromkeys(v for raw in found for v in (raw, unquote(raw))))


def _str(raw: str) -> str:
    return raw.strip()


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], message: str) -> Callable[[str], Any]:
    """A parser: `convert` the stripped text, then refuse a value for which `ok` is false (NaN never passes)."""

    def parse(raw: str) -> Any:
        value = convert(raw.strip())
        if not ok(value):
            raise ValueError(message)
        return value

    return parse


def _one_of(*allowed: str, case: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    """A parser that accepts one of `allowed` (compared after `case`), the error naming them all."""
    expected = "expected " + ", ".join(allowed[:-1]) + " or " + allowed[-1]

    def parse(raw: str) -> str:
        value = case(raw.strip())
        if value not in allowed:
            raise ValueError(expected)
        return value

    return parse


_positive_int = _checked(int, lambda v: v > 0, "must be a positive whole number")
MAX_SHARDS = 1024  # as many as an Airflow mapped task takes by default (its max_map_length)
_shard_count = _checked(
    int, lambda v: 0 < v <= MAX_SHARDS, f"must be a whole number from 1 to {MAX_SHARDS} (Airflow's max_map_length)"
)
_non_negative_int = _checked(int, lambda v: v >= 0, "must be zero or more")
# Finite only: inf (or 1e400) passed a comparison with 0, and then broke a timeout, a sleep or an SQL interval.
_positive_float = _checked(float, lambda v: 0 < v < math.inf, "must be a positive number (finite)")
_non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "must be zero or more (finite)")


def _float_up_to(most: float, shown: str, *, positive: bool) -> Callable[[str], float]:
    """A parser of a number from 0 (or above 0) to `most`: a larger one overflows what it ends up in."""
    if positive:
        return _checked(float, lambda v: 0 < v <= most, f"must be a positive number, at most {shown}")
    return _checked(float, lambda v: 0 <= v <= most, f"must be zero or more, at most {shown}")


# Seconds: a socket timeout, a sleep or an Event.wait past about 9.2e9 s raises OverflowError (and math.ceil of
# inf in the reconnect wait); a day is longer than any of these should ever be.
_seconds = _float_up_to(86_400, "86,400 (one day)", positive=True)
_seconds_or_zero = _float_up_to(86_400, "86,400 (one day)", positive=False)
# Minutes of an SQL interval, times up to 48 (the doubling's cap, etl/db/archive.py), taken from now(): far below
# PostgreSQL's interval and timestamp ranges at ten years (x 48 = 480 years).
_backoff_minutes = _float_up_to(5_256_000, "5,256,000 (ten years)", positive=False)
_threshold = _checked(float, lambda v: 0 <= v < 1, "must be between 0 and 1")
_hamming = _checked(
    int, lambda v: 0 <= v <= 7, "must be a whole number from 0 to 7 (the band index finds every match up to 7)"
)
_log_format = _one_of("text", "json")
_log_level = _one_of("DEBUG", "INFO", "WARNING", "ERROR", case=str.upper)
_deleted_policy = _one_of("mark", "forget")


def _s3_prefix(raw: str) -> str:
    value = raw.strip().lstrip("/")
    if value and not value.endswith("/"):
        value += "/"
    if ".." in value.split("/") or any(ord(c) < 32 for c in value):
        raise ValueError("must not contain '..' segments or control characters")
    return value


def _export_prefix(raw: str) -> str:
    value = _s3_prefix(raw)
    if not value:
        raise ValueError("must not be empty (the export needs a prefix of its own, apart from image keys)")
    return value


def _http_base(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise ValueError("expected an http(s) URL")
    return value


# The parsers, by the names a source's SETTINGS import them under (etl/sources/*.py).
text, flag, comma_list, http_base = _str, _bool, _list, _http_base
positive_int, non_negative_int, positive_float, non_negative_float = _positive_int, _non_negative_int, _positive_float, _non_negative_float


@dataclass(frozen=True)
class Setting:
    """One setting: its environment variable, parser, default, one-line doc, and whether it is secret.

    Core settings are fields of `Settings` below; a source declares its own in its module as
    `SETTINGS = (Setting(...), ...)`, read into `settings.source(name)` (see SourceSettings).
    """

    env: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    secret: bool = False

    def read(self, raw: str) -> Any:
        """The parsed value of `raw`; a bad one is a ConfigError naming the variable (a secret is not echoed)."""
        try:
            value = self.parse(raw)
        except (ValueError, TypeError) as exc:
            shown = "***" if self.secret else repr(raw)
            raise ConfigError(f"{self.env}={shown} is invalid: {exc}") from None
        return Secret(value) if self.secret else value


def _setting(env: str, parse: Callable[[str], Any], default: Any, doc: str, secret: bool = False) -> Any:
    return field(default=default, metadata={"setting": Setting(env, parse, default, doc, secret)})


class SourceSettings:
    """The settings one source declares, and only those: YOUTUBE_API_KEY is `.api_key` of source("youtube").

    An attribute is the variable's name, lower case, less the source's name and "_" in front.
    """

    def __init__(self, source: str, declared: Sequence[Setting] = (), values: Mapping[str, Any] | None = None):
        values = values or {}
        by_attr = {}
        for setting in declared:
            attr = setting.env.lower().removeprefix(source.lower() + "_")
            if attr.startswith("_") or hasattr(SourceSettings, attr):
                raise ConfigError(f"{setting.env}: the {source} source cannot name a setting {attr!r}")
            by_attr[attr] = setting
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_declared", by_attr)
        object.__setattr__(self, "_values", {a: values.get(s.env, s.default) for a, s in by_attr.items()})

    def __getattr__(self, attr: str) -> Any:
        try:
            return self.__dict__["_values"][attr]
        except KeyError:
            declared = ", ".join(self.__dict__["_declared"]) or "none"
            raise AttributeError(f"the {self._source} source declares no setting {attr!r} (it declares: {declared})") from None

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError("settings are read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SourceSettings) and (self._source, self._values) == (other._source, other._values)

    def __hash__(self) -> int:
        return hash(self._source)

    def __repr__(self) -> str:
        return f"SourceSettings({self._source}: " + ", ".join(f"{a}={v!r}" for a, v in self._values.items()) + ")"

    def env_name(self, attr: str) -> str:
        return self._declared[attr].env

    def require(self, *attrs: str) -> None:
        """Raise ConfigError naming the first of these settings (attribute names) that is empty."""
        for attr in attrs:
            if not getattr(self, attr):
                raise ConfigError(f"{self.env_name(attr)} is not set")

    def secrets(self) -> list[str]:
        return [self._values[a].reveal() for a, s in self._declared.items() if s.secret and self._values[a]]


@dataclass(frozen=True)
class Settings:
    """The core settings (store, database, runs, limits); each field holds its Setting in its metadata.

    A source's own settings are not fields here: they are declared in its module and read by `source(name)`.
    """

    # Storage: PostgreSQL and the object store.
    database_url: Secret = _setting(
        "DATABASE_URL", _str, Secret(""), "PostgreSQL URL; unset = embedded PostgreSQL under ETL_DATA_DIR/postgres", secret=True
    )
    data_dir: Path = _setting("ETL_DATA_DIR", lambda raw: Path(raw.strip()), Path("data"), "where embedded data lives")
    s3_bucket: str = _setting("S3_BUCKET", _str, "", "bucket for images; unset = local store under ETL_DATA_DIR/objects")
    s3_prefix: str = _setting("S3_PREFIX", _s3_prefix, "", "key prefix inside the bucket (a trailing / is added)")
    aws_region: str = _setting("AWS_REGION", _str, "", "region of the bucket (boto3's default chain when unset)")
    s3_direct_put: bool = _setting(
        "S3_DIRECT_PUT", _bool, True, "sign image PUTs here and send them over a plain pool (a third of boto3's CPU); false = boto3 put_object for all"
    )

    # Which sources a bare run uses.
    sources: tuple[str, ...] = _setting(
        "ETL_SOURCES", _list, (), "comma list of sources for a bare `python etl.py`; unset = mock, on the embedded set-up only"
    )

    # Images: limits, timeouts, concurrency.
    max_image_bytes: int = _setting("ETL_MAX_IMAGE_BYTES", _positive_int, 20 * 1024 * 1024, "largest image accepted")
    connect_timeout: float = _setting("ETL_CONNECT_TIMEOUT", _seconds, 5.0, "seconds to connect (at most 86,400)")
    read_timeout: float = _setting("ETL_READ_TIMEOUT", _seconds, 20.0, "seconds between bytes (at most 86,400)")
    http_retries: int = _setting("ETL_HTTP_RETRIES", _positive_int, 4, "attempts per request (429, 5xx, connection errors)")
    retry_max_wait: float = _setting("ETL_RETRY_MAX_WAIT", _seconds_or_zero, 30.0, "longest wait between attempts (s, at most 86,400)")
    # 64: a worker waits out the host's latency per image (at 50 ms, 20 images/s at most), so 32 capped a run at
    # about 620 images/s however little CPU an image costs; the connection pools follow (concurrency + 4).
    concurrency: int = _setting("ETL_CONCURRENCY", _positive_int, 64, "images downloaded and stored at once")
    max_redirects: int = _setting("ETL_MAX_REDIRECTS", _non_negative_int, 5, "redirects followed per image")
    decode_memory_mb: int = _setting(
        "ETL_DECODE_MEMORY_MB", _positive_int, 256, "memory (MB) image checks may hold at once; larger decodes wait their turn"
    )
    allow_private_hosts: bool = _setting(
        "ETL_ALLOW_PRIVATE_HOSTS", _bool, False, "allow image hosts on loopback, private or link-local addresses (the API bases are trusted settings)"
    )
    image_max_attempts: int = _setting("ETL_IMAGE_MAX_ATTEMPTS", _positive_int, 8, "runs that retry a failed image")
    image_retry_backoff_minutes: float = _setting(
        "ETL_IMAGE_RETRY_BACKOFF_MINUTES", _backoff_minutes, 30.0,
        "wait (minutes, at most 5,256,000) before retrying a failed image; doubles each attempt",
    )

    # Loading, enrichment, runs.
    batch_size: int = _setting("ETL_BATCH_SIZE", _positive_int, 500, "posts per database batch")
    metadata_batch_size: int = _setting(
        "ETL_METADATA_BATCH_SIZE", _non_negative_int, 0,
        "posts per database batch after a batch without images (metadata only); 0 = 4 x ETL_BATCH_SIZE",
    )  # fmt: skip
    source_paths: tuple[str, ...] = _setting(
        "ETL_SOURCE_PATHS", _list, (), "extra sources: comma list of .py files or module names, each registering a Source"
    )
    shards: int = _setting("ETL_SHARDS", _shard_count, 1, "shards of the Airflow DAG's run by default (its param `shards`)")
    db_reconnect_seconds: float = _setting(
        "ETL_DB_RECONNECT_SECONDS", _seconds_or_zero, 15.0,
        "longest total wait (s, at most 86,400) for a lost database to come back; past it the run stops, naming the batch not loaded",
    )  # fmt: skip
    stop_grace: float = _setting(
        "ETL_STOP_GRACE", _seconds_or_zero, 5.0,
        "on SIGTERM, seconds (at most 86,400) the downloads in flight may take to finish (the rest are marked failed, retried next run)",
    )  # fmt: skip
    sentiment_threshold: float = _setting(
        "SENTIMENT_THRESHOLD", _threshold, 0.05, "polarity >= t is positive, <= -t negative, else neutral"
    )
    overlap_minutes: int = _setting(
        "ETL_OVERLAP_MINUTES", _checked(int, lambda v: 0 <= v <= 5_256_000, "must be between 0 and 5,256,000 (ten years)"), 60,
        "incremental runs re-read this much before the watermark",
    )  # fmt: skip
    log_format: str = _setting("ETL_LOG_FORMAT", _log_format, "text", "text or json (one object a line)")
    log_level: str = _setting("ETL_LOG_LEVEL", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR")
    log_file: str = _setting("ETL_LOG_FILE", _str, "", "also append logs to this file")
    # Insights (issue 14): near-duplicate images, rising hashtags.
    similar_max_distance: int = _setting(
        "ETL_SIMILAR_MAX_DISTANCE", _hamming, 5, "Hamming distance (0-7) of 64-bit image hashes that counts as the same picture"
    )
    trends_min_count: int = _setting("ETL_TRENDS_MIN_COUNT", _positive_int, 5, "posts a hashtag needs in the window to rank in trends")
    metrics_path: str = _setting("ETL_METRICS_PATH", _str, "", "Prometheus textfile written after each run")
    progress_seconds: float = _setting(
        "ETL_PROGRESS_SECONDS", _seconds_or_zero, 30.0,
        "without a terminal (cron): a progress log line this often (s, at most 86,400); 0 = none",
    )

    # Trust over years: language, deletions (README: Language, Deletions).
    detect_language: bool = _setting(
        "ETL_DETECT_LANGUAGE", _bool, True, "guess a caption's language when the platform gives none (py3langid)"
    )
    deleted_at_source: str = _setting(
        "ETL_DELETED_AT_SOURCE", _deleted_policy, "mark",
        "when a platform says a post we hold is gone: mark (keep it, set deleted_at_source) or forget (remove it)",
    )  # fmt: skip
    recheck_posts: int = _setting(
        "ETL_RECHECK_POSTS", _non_negative_int, 300,
        "each run asks the platform about this many held posts per source, least recently checked first; 0 = off",
    )  # fmt: skip

    # Parquet export (`etl.py export`).
    export_prefix: str = _setting(
        "ETL_EXPORT_PREFIX", _export_prefix, "export/", "key prefix of the Parquet export under S3_PREFIX; no platform may take its name"
    )
    export_row_group: int = _setting("ETL_EXPORT_ROW_GROUP", _positive_int, 100_000, "rows per Parquet row group")

    # Each source's own settings, declared in its module (etl/sources/<name>.py: SETTINGS); see source().
    per_source: Mapping[str, SourceSettings] = field(default_factory=dict, hash=False)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"Settings({shown})"

    def source(self, name: str) -> SourceSettings:
        """The settings the source `name` declares, read from the environment by load_settings (defaults
        when these Settings were built without it, or the source declares none)."""
        if name in self.per_source:
            return self.per_source[name]
        from etl.sources import declared_settings_of

        return SourceSettings(name, declared_settings_of(name))

    @property
    def embedded_db(self) -> bool:
        return not self.database_url

    @property
    def objects_dir(self) -> Path:
        return self.data_dir / "objects"

    @property
    def reserved_platform(self) -> str:
        """The first segment of ETL_EXPORT_PREFIX: a platform of that name would put images among the export."""
        return self.export_prefix.split("/", 1)[0].lower()

    def secrets(self) -> list[str]:
        """Every secret value set, and the password inside DATABASE_URL, for log redaction."""
        values = [getattr(self, f.name).reveal() for f, setting in _core_fields() if setting.secret]
        values += [value for own in self.per_source.values() for value in own.secrets()]
        if self.database_url:
            values += url_password(self.database_url.reveal())
        return [value for value in values if value]

    def require(self, *names: str) -> None:
        """Raise ConfigError naming the first of these settings (field names) that is empty."""
        for name in names:
            if not getattr(self, name):
                raise ConfigError(f"{env_name(name)} is not set")


def _core_fields() -> list[tuple[Any, Setting]]:
    return [(f, f.metadata["setting"]) for f in fields(Settings) if "setting" in f.metadata]


def env_name(field_name: str) -> str:
    return next(setting.env for f, setting in _core_fields() if f.name == field_name)


def all_settings() -> list[tuple[str, Setting]]:
    """(group, Setting) for every setting: the core ones (group "") in declaration order, then each
    registered source's (group = its name), sources by name. Sources of ETL_SOURCE_PATHS count once loaded."""
    from etl.sources import declared_settings

    core = [("", setting) for _, setting in _core_fields()]
    return core + [(name, s) for name, declared in sorted(declared_settings().items()) for s in declared]


# Variables read by boto3 itself, documented in .env.example but not held in Settings.
BOTO3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_settings(env: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env") -> Settings:
    """Build Settings from `env` (default: os.environ over the values in .env)."""
    if env is None:
        env = merged_environment(dotenv_path)
    values: dict[str, Any] = {}
    for f, setting in _core_fields():
        raw = env.get(setting.env)
        if setting.env == "ETL_SOURCES" and raw is not None and not _list(raw):
            # Set but empty: a cron job with a mistyped list must not fall back to the mock source.
            raise ConfigError("ETL_SOURCES is set but empty: name the sources (for example ETL_SOURCES=youtube,twitter)")
        if raw is not None and raw.strip():
            values[f.name] = setting.read(raw)
    if "sources" not in values and not values.get("database_url"):
        values["sources"] = ("mock",)  # the embedded default set-up (no DATABASE_URL) runs the mock source
    settings = Settings(**values)
    for source in settings.sources:
        if not _NAME_OK.match(source):
            raise ConfigError(f"ETL_SOURCES has an invalid source name {source!r}")
        if source.lower() == settings.reserved_platform:
            raise ConfigError(f"ETL_SOURCES: {source!r} is the name of ETL_EXPORT_PREFIX ({settings.export_prefix}), reserved for the export")
    if settings.database_url and not settings.database_url.reveal().startswith(("postgres://", "postgresql://")):
        raise ConfigError(f"DATABASE_URL must start with postgresql:// (got {mask_url_password(settings.database_url.reveal())})")
    return replace(settings, per_source=_read_source_settings(settings, env))


def _read_source_settings(settings: Settings, env: Mapping[str, str]) -> dict[str, SourceSettings]:
    """Each registered source's declared settings, parsed (ETL_SOURCE_PATHS loaded first, so a plugin's count).

    A built-in platform that `env` names no setting of is left out (and not imported): its settings are its
    defaults, which Settings.source() gives it."""
    from etl.sources import load_source_modules, settings_in_use

    load_source_modules(settings.source_paths)
    owner = {setting.env: "the core settings (etl/config.py)" for _, setting in _core_fields()}
    per_source = {}
    for name, declared in sorted(settings_in_use(env).items()):
        for setting in declared:
            if owner.setdefault(setting.env, f"the {name} source") != f"the {name} source":
                raise ConfigError(f"{setting.env} is declared by the {name} source and by {owner[setting.env]}")
        read = {s.env: s.read(env[s.env]) for s in declared if env.get(s.env, "").strip()}
        per_source[name] = SourceSettings(name, declared, read)
    return per_source


def merged_environment(dotenv_path: str | Path | None = ".env") -> dict[str, str]:
    """os.environ over the values in .env; boto3's own variables from .env are put into os.environ for it."""
    env = dict(os.environ)
    if dotenv_path and Path(dotenv_path).is_file():
        file_values = read_dotenv(Path(dotenv_path))
        env = {**file_values, **env}
        # boto3 reads its own variables from the process environment.
        for name in BOTO3_VARIABLES + ("AWS_REGION", "AWS_DEFAULT_REGION"):
            if name in file_values and name not in os.environ:
                os.environ[name] = file_values[name]
    return env


def read_dotenv(path: Path) -> dict[str, str]:
    """The values of a .env file; a line python-dotenv cannot parse is a warning naming the file and line."""
    import logging

    from dotenv import dotenv_values

    dotenv_log = logging.getLogger("dotenv.main")
    unparsed: list[str] = []

    class _Collect(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            unparsed.append(record.getMessage())
            return False  # said once, below, with the file's name

    collect = _Collect()
    dotenv_log.addFilter(collect)
    try:
        values = {k: v for k, v in dotenv_values(path, encoding="utf-8").items() if v is not None}
    except UnicodeDecodeError as exc:  # saved by an editor in Latin-1, say
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    finally:
        dotenv_log.removeFilter(collect)
    for message in unparsed:
        line = re.search(r"line (\d+)", message)
        where = f"{path}, line {line.group(1)}" if line else str(path)
        logging.getLogger(__name__).warning("%s: cannot parse this line (ignored); expected NAME=value", where)
    return values


# Prefixes of our core settings; an unknown variable with one of them, or with a registered source's name
# and "_" in front (YOUTUBE_, TINY_), is probably a misspelling.
# AWS_ is left out: boto3 and the AWS CLI read dozens of AWS_ variables (AWS_ENDPOINT_URL_S3 is not a typo).
SETTING_PREFIXES = ("ETL_", "S3_", "DATABASE_", "SENTIMENT_")
# Read under those prefixes by scripts/cron_run.sh, not by Settings: the variables that script reads, all of
# them (tests/test_config.py compares this list with the script's text, so a new one cannot be taken for a typo).
CRON_SCRIPT_VARIABLES = ("ETL_PYTHON", "ETL_CRON_LOG", "ETL_CRON_LOCK")


def misspelled_settings(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it probably means) for each unknown variable with our prefixes close to a known one."""
    from etl.sources import settings_in_use, source_names

    # Known to the core and to the sources `env` names (the usual case: nothing unknown) needs no other platform
    # imported; an unknown variable is compared with every source's settings.
    prefixes = SETTING_PREFIXES + tuple(f"{name.upper()}_" for name in source_names())
    known_here = {setting.env for _, setting in _core_fields()} | set(CRON_SCRIPT_VARIABLES)
    known_here.update(s.env for declared in settings_in_use(env).values() for s in declared)
    if not any(name not in known_here and name.upper().startswith(prefixes) for name in env):
        return []
    import difflib

    known = [setting.env for _, setting in all_settings()] + [*CRON_SCRIPT_VARIABLES]
    found = []
    for name in sorted(env):
        if name in known or not name.upper().startswith(prefixes):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
        if close:
            found.append((name, close[0]))
    return found
