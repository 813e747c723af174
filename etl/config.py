"""Reads the environment (and .env) once into a frozen Settings object; nothing else reads os.environ."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from etl.errors import ConfigError


class Secret(str):
    """A string that never shows itself in repr() or logs; use .reveal() where the value is needed."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def reveal(self) -> str:
        return str.__str__(self)


def mask_url_password(url: str) -> str:
    """postgresql://user:pw@host/db -> postgresql://user:***@host/db (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=netloc[0].split(":", 1)[0] + ":***@" + netloc[1]))


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


def _positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw.strip())
    if not value >= 0:
        raise ValueError("must be zero or more")
    return value


def _threshold(raw: str) -> float:
    value = float(raw.strip())
    if not 0 <= value < 1:
        raise ValueError("must be between 0 and 1")
    return value


def _hamming(raw: str) -> int:
    value = int(raw.strip())
    if not 0 <= value <= 7:
        raise ValueError("must be a whole number from 0 to 7 (the band index finds every match up to 7)")
    return value


def _log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return value


def _s3_prefix(raw: str) -> str:
    value = raw.strip().lstrip("/")
    if value and not value.endswith("/"):
        value += "/"
    if ".." in value.split("/") or any(ord(c) < 32 for c in value):
        raise ValueError("must not contain '..' segments or control characters")
    return value


def _deleted_policy(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("mark", "forget"):
        raise ValueError("expected mark or forget")
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


def _setting(env: str, parse: Callable[[str], Any], default: Any, doc: str, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting of the archiver; each field names its environment variable in its metadata."""

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

    # Platform credentials and modes.
    youtube_api_key: Secret = _setting("YOUTUBE_API_KEY", _str, Secret(""), "YouTube Data API v3 key", secret=True)
    youtube_channel_ids: tuple[str, ...] = _setting("YOUTUBE_CHANNEL_IDS", _list, (), "channels whose uploads to archive")
    youtube_query: str = _setting("YOUTUBE_QUERY", _str, "", "search.list query (costs 100 units a page)")
    youtube_api_base: str = _setting("YOUTUBE_API_BASE", _http_base, "", "API endpoint override (proxies, mirrors, tests)")
    youtube_daily_quota: int = _setting("YOUTUBE_DAILY_QUOTA", _positive_int, 10000, "quota units this archiver may spend a day")
    twitter_bearer_token: Secret = _setting("TWITTER_BEARER_TOKEN", _str, Secret(""), "X API v2 app bearer token", secret=True)
    twitter_query: str = _setting("TWITTER_QUERY", _str, "", "recent search query")
    twitter_usernames: tuple[str, ...] = _setting("TWITTER_USERNAMES", _list, (), "user timelines to archive")
    twitter_api_base: str = _setting("TWITTER_API_BASE", _http_base, "https://api.x.com", "API base URL")
    twitter_max_wait: float = _setting("TWITTER_MAX_WAIT", _non_negative_float, 900.0, "longest wait (s) for a rate-limit reset")
    instagram_access_token: Secret = _setting(
        "INSTAGRAM_ACCESS_TOKEN", _str, Secret(""), "Instagram Graph API user access token", secret=True
    )
    instagram_user_id: str = _setting("INSTAGRAM_USER_ID", _str, "", "Instagram Business/Creator account id")
    instagram_hashtags: tuple[str, ...] = _setting("INSTAGRAM_HASHTAGS", _list, (), "hashtags (without #) to archive")
    instagram_api_base: str = _setting("INSTAGRAM_API_BASE", _http_base, "https://graph.facebook.com/v21.0", "Graph API base URL")
    instagram_own_media: bool = _setting(
        "INSTAGRAM_OWN_MEDIA", _bool, True, "archive the account's own media (false: only INSTAGRAM_HASHTAGS)"
    )

    bluesky_actors: tuple[str, ...] = _setting("BLUESKY_ACTORS", _list, (), "Bluesky handles or DIDs whose author feeds to archive")
    bluesky_query: str = _setting("BLUESKY_QUERY", _str, "", "Bluesky post search (searchPosts, needs BLUESKY_HANDLE and BLUESKY_APP_PASSWORD)")
    bluesky_handle: str = _setting("BLUESKY_HANDLE", _str, "", "Bluesky account handle for the session (search only)")
    bluesky_app_password: Secret = _setting(
        "BLUESKY_APP_PASSWORD", _str, Secret(""), "Bluesky app password (Settings > App passwords)", secret=True
    )
    bluesky_api_base: str = _setting("BLUESKY_API_BASE", _http_base, "https://public.api.bsky.app", "Bluesky AppView for public reads")
    bluesky_pds_base: str = _setting("BLUESKY_PDS_BASE", _http_base, "https://bsky.social", "Bluesky PDS for the session and search")
    mastodon_instance: str = _setting("MASTODON_INSTANCE", _http_base, "", "Mastodon instance base URL, e.g. https://mastodon.social")
    mastodon_hashtags: tuple[str, ...] = _setting("MASTODON_HASHTAGS", _list, (), "hashtag timelines (without #) to archive")
    mastodon_accounts: tuple[str, ...] = _setting("MASTODON_ACCOUNTS", _list, (), "accounts (@user@host) whose statuses to archive")
    mastodon_access_token: Secret = _setting(
        "MASTODON_ACCESS_TOKEN", _str, Secret(""), "optional Mastodon access token (instances that refuse public timelines)", secret=True
    )
    reddit_client_id: str = _setting("REDDIT_CLIENT_ID", _str, "", "Reddit app client id (approved API access)")
    reddit_client_secret: Secret = _setting("REDDIT_CLIENT_SECRET", _str, Secret(""), "Reddit app client secret", secret=True)
    reddit_user_agent: str = _setting(
        "REDDIT_USER_AGENT", _str, "", "descriptive User-Agent Reddit requires, e.g. 'linux:org.example.archiver:1.0 (by /u/you)'"
    )
    reddit_subreddits: tuple[str, ...] = _setting("REDDIT_SUBREDDITS", _list, (), "subreddits (without r/) whose /new listing to archive")
    reddit_api_base: str = _setting("REDDIT_API_BASE", _http_base, "https://oauth.reddit.com", "Reddit OAuth API base URL")
    reddit_auth_base: str = _setting("REDDIT_AUTH_BASE", _http_base, "https://www.reddit.com", "Reddit token endpoint base URL")

    # Mock source.
    mock_seed: int = _setting("MOCK_SEED", _non_negative_int, 42, "seed of the mock source")
    mock_posts: int = _setting("MOCK_POSTS", _non_negative_int, 40, "how many posts the mock source offers")

    # Images: limits, timeouts, concurrency.
    max_image_bytes: int = _setting("ETL_MAX_IMAGE_BYTES", _positive_int, 20 * 1024 * 1024, "largest image accepted")
    connect_timeout: float = _setting("ETL_CONNECT_TIMEOUT", _positive_float, 5.0, "seconds to connect")
    read_timeout: float = _setting("ETL_READ_TIMEOUT", _positive_float, 20.0, "seconds between bytes")
    http_retries: int = _setting("ETL_HTTP_RETRIES", _positive_int, 4, "attempts per request (429, 5xx, connection errors)")
    retry_max_wait: float = _setting("ETL_RETRY_MAX_WAIT", _non_negative_float, 30.0, "longest wait between attempts (s)")
    concurrency: int = _setting("ETL_CONCURRENCY", _positive_int, 32, "images downloaded and stored at once")
    max_redirects: int = _setting("ETL_MAX_REDIRECTS", _non_negative_int, 5, "redirects followed per image")
    decode_memory_mb: int = _setting(
        "ETL_DECODE_MEMORY_MB", _positive_int, 256, "memory (MB) image checks may hold at once; larger decodes wait their turn"
    )
    allow_private_hosts: bool = _setting(
        "ETL_ALLOW_PRIVATE_HOSTS", _bool, False, "allow image hosts on loopback, private or link-local addresses (the API bases are trusted settings)"
    )
    image_max_attempts: int = _setting("ETL_IMAGE_MAX_ATTEMPTS", _positive_int, 8, "runs that retry a failed image")
    image_retry_backoff_minutes: float = _setting(
        "ETL_IMAGE_RETRY_BACKOFF_MINUTES", _non_negative_float, 30.0, "wait before retrying a failed image; doubles each attempt"
    )

    # Loading, enrichment, runs.
    batch_size: int = _setting("ETL_BATCH_SIZE", _positive_int, 500, "posts per database batch")
    source_paths: tuple[str, ...] = _setting(
        "ETL_SOURCE_PATHS", _list, (), "extra sources: comma list of .py files or module names, each registering a Source"
    )
    shards: int = _setting("ETL_SHARDS", _positive_int, 1, "shards of the Airflow DAG's run by default (its param `shards`)")
    db_reconnect_seconds: float = _setting(
        "ETL_DB_RECONNECT_SECONDS", _non_negative_float, 15.0,
        "longest total wait (s) for a lost database to come back; past it the run stops, naming the batch not loaded",
    )  # fmt: skip
    stop_grace: float = _setting(
        "ETL_STOP_GRACE", _non_negative_float, 5.0,
        "on SIGTERM, seconds the downloads in flight may take to finish (the rest are marked failed, retried next run)",
    )  # fmt: skip
    sentiment_threshold: float = _setting(
        "SENTIMENT_THRESHOLD", _threshold, 0.05, "polarity >= t is positive, <= -t negative, else neutral"
    )
    overlap_minutes: int = _setting("ETL_OVERLAP_MINUTES", _non_negative_int, 60, "incremental runs re-read this much before the watermark")
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
        "ETL_PROGRESS_SECONDS", _non_negative_float, 30.0, "without a terminal (cron): a progress log line this often (s); 0 = none"
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

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"Settings({shown})"

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
        values = [getattr(self, f.name).reveal() for f in fields(self) if f.metadata["secret"]]
        if self.database_url:
            try:
                password = urlsplit(self.database_url.reveal()).password
            except ValueError:
                password = None
            if password:
                values.append(password)
        return [value for value in values if value]

    def require(self, *names: str) -> None:
        """Raise ConfigError naming the first of these settings (field names) that is empty."""
        for name in names:
            if not getattr(self, name):
                raise ConfigError(f"{env_name(name)} is not set")


def env_name(field_name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == field_name)


def setting_docs() -> list[tuple[str, str, bool]]:
    """(environment variable, doc, secret) for every setting, in declaration order."""
    return [(f.metadata["env"], f.metadata["doc"], f.metadata["secret"]) for f in fields(Settings)]


# Variables read by boto3 itself, documented in .env.example but not held in Settings.
BOTO3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_settings(env: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env") -> Settings:
    """Build Settings from `env` (default: os.environ over the values in .env)."""
    if env is None:
        env = merged_environment(dotenv_path)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = f.metadata["env"]
        raw = env.get(name)
        if name == "ETL_SOURCES" and raw is not None and not _list(raw):
            # Set but empty: a cron job with a mistyped list must not fall back to the mock source.
            raise ConfigError("ETL_SOURCES is set but empty: name the sources (for example ETL_SOURCES=youtube,twitter)")
        if raw is None or raw.strip() == "":
            continue
        try:
            value = f.metadata["parse"](raw)
        except (ValueError, TypeError) as exc:
            shown = "***" if f.metadata["secret"] else repr(raw)
            raise ConfigError(f"{name}={shown} is invalid: {exc}") from None
        values[f.name] = Secret(value) if f.metadata["secret"] else value
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
    return settings


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
        values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    finally:
        dotenv_log.removeFilter(collect)
    for message in unparsed:
        line = re.search(r"line (\d+)", message)
        where = f"{path}, line {line.group(1)}" if line else str(path)
        logging.getLogger(__name__).warning("%s: cannot parse this line (ignored); expected NAME=value", where)
    return values


# Prefixes of our settings (and of the platforms coming next); an unknown variable with one of them is
# probably a misspelling.
# AWS_ is left out: boto3 and the AWS CLI read dozens of AWS_ variables (AWS_ENDPOINT_URL_S3 is not a typo).
SETTING_PREFIXES = ("ETL_", "S3_", "DATABASE_", "YOUTUBE_", "TWITTER_", "INSTAGRAM_", "BLUESKY_", "MASTODON_", "REDDIT_", "MOCK_", "SENTIMENT_")
# Read under those prefixes by our own scripts (scripts/cron_run.sh), not by Settings.
_OTHER_KNOWN = ("ETL_PYTHON", "ETL_CRON_LOG")


def misspelled_settings(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it probably means) for each unknown variable with our prefixes close to a known one."""
    import difflib

    known = [f.metadata["env"] for f in fields(Settings)] + ["DATABASE_URL", *_OTHER_KNOWN]
    found = []
    for name in sorted(env):
        if name in known or not name.upper().startswith(SETTING_PREFIXES):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
        if close:
            found.append((name, close[0]))
    return found
