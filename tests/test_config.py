"""Settings: every malformed or missing setting is a ConfigError naming it; secrets never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl.config import Secret, load_settings
from etl.errors import ConfigError, ExitCode


def test_defaults_without_environment(make_settings):
    settings = make_settings()
    assert settings.sources == ("mock",)
    assert settings.embedded_db
    assert settings.s3_bucket == ""
    assert settings.objects_dir == settings.data_dir / "objects"
    assert settings.allow_private_hosts is False
    assert (settings.log_format, settings.log_level) == ("text", "INFO")
    assert make_settings(ETL_LOG_FORMAT=" Text ").log_format == "text"


def test_values_are_parsed(make_settings):
    settings = make_settings(
        ETL_SOURCES=" mock, jsonl ,,",
        ETL_MAX_IMAGE_BYTES="1024",
        ETL_READ_TIMEOUT="0.5",
        ETL_ALLOW_PRIVATE_HOSTS="Yes",
        S3_PREFIX="/archive",
        SENTIMENT_THRESHOLD="0.1",
    )
    assert settings.sources == ("mock", "jsonl")
    assert settings.max_image_bytes == 1024
    assert settings.read_timeout == 0.5
    assert settings.allow_private_hosts is True
    assert settings.s3_prefix == "archive/"
    assert settings.sentiment_threshold == 0.1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ETL_MAX_IMAGE_BYTES", "lots"),
        ("ETL_MAX_IMAGE_BYTES", "0"),
        ("ETL_READ_TIMEOUT", "-1"),
        ("ETL_CONCURRENCY", "1.5"),
        ("ETL_ALLOW_PRIVATE_HOSTS", "perhaps"),
        ("SENTIMENT_THRESHOLD", "1.5"),
        ("ETL_LOG_FORMAT", "xml"),
        ("S3_PREFIX", "a/../b"),
        ("YOUTUBE_API_BASE", "ftp://example.com"),
        ("ETL_SOURCES", "mock,../evil"),
        ("DATABASE_URL", "mysql://user:hunter22@db/archive"),
    ],
)
def test_malformed_setting_is_a_config_error_naming_it(make_settings, name, value):
    with pytest.raises(ConfigError) as info:
        make_settings(**{name: value})
    assert name in str(info.value)
    assert info.value.exit_code == ExitCode.CONFIG


@pytest.mark.badinput("a number out of range or a word not among the choices: the message says what is accepted")
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ETL_MAX_IMAGE_BYTES", "-3", "must be a positive whole number"),
        ("ETL_MAX_REDIRECTS", "-1", "must be zero or more"),
        ("ETL_READ_TIMEOUT", "nan", "must be a positive number"),
        ("ETL_RETRY_MAX_WAIT", "-0.5", "must be zero or more"),
        ("SENTIMENT_THRESHOLD", "1", "must be between 0 and 1"),
        ("ETL_SIMILAR_MAX_DISTANCE", "8", "must be a whole number from 0 to 7"),
        ("ETL_LOG_FORMAT", "xml", "expected text or json"),
        ("ETL_LOG_LEVEL", "loud", "expected DEBUG, INFO, WARNING or ERROR"),
        ("ETL_DELETED_AT_SOURCE", "shred", "expected mark or forget"),
    ],
)
def test_a_refused_value_is_told_what_is_accepted(make_settings, name, value, message):
    with pytest.raises(ConfigError) as info:
        make_settings(**{name: value})
    assert str(info.value).startswith(f"{name}={value!r} is invalid: {message}")


SECONDS = ("ETL_CONNECT_TIMEOUT", "ETL_READ_TIMEOUT", "ETL_RETRY_MAX_WAIT", "ETL_DB_RECONNECT_SECONDS", "ETL_STOP_GRACE",
           "ETL_PROGRESS_SECONDS")  # fmt: skip


@pytest.mark.badinput("a float setting infinite or past its bound (it overflowed a timeout, a sleep or an SQL interval)")
@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "86400.5"])
@pytest.mark.parametrize("name", SECONDS)
def test_a_setting_in_seconds_is_finite_and_at_most_a_day(make_settings, name, value):
    with pytest.raises(ConfigError) as info:
        make_settings(**{name: value})
    assert str(info.value).startswith(f"{name}={value!r} is invalid: must be ")
    assert str(info.value).endswith("at most 86,400 (one day)")


@pytest.mark.badinput("ETL_IMAGE_RETRY_BACKOFF_MINUTES or TWITTER_MAX_WAIT infinite, or the backoff past ten years")
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ETL_IMAGE_RETRY_BACKOFF_MINUTES", "inf", "must be zero or more, at most 5,256,000 (ten years)"),
        ("ETL_IMAGE_RETRY_BACKOFF_MINUTES", "1e400", "must be zero or more, at most 5,256,000 (ten years)"),
        ("ETL_IMAGE_RETRY_BACKOFF_MINUTES", "5256001", "must be zero or more, at most 5,256,000 (ten years)"),
        ("TWITTER_MAX_WAIT", "inf", "must be zero or more (finite)"),
    ],
)
def test_an_infinite_or_too_long_wait_is_refused_naming_its_range(make_settings, name, value, message):
    with pytest.raises(ConfigError) as info:
        make_settings(**{name: value})
    assert str(info.value) == f"{name}={value!r} is invalid: {message}"


@pytest.mark.badinput("ETL_SHARDS past 1,024 (Airflow's max_map_length): refused naming it, not as --shards")
@pytest.mark.parametrize("value", ["1025", "0", "1000000"])
def test_etl_shards_past_airflows_map_length_is_refused_naming_it(make_settings, run_etl, value):
    with pytest.raises(ConfigError) as info:
        make_settings(ETL_SHARDS=value)
    assert str(info.value) == f"ETL_SHARDS={value!r} is invalid: must be a whole number from 1 to 1024 (Airflow's max_map_length)"
    assert make_settings(ETL_SHARDS="1024").shards == 1024
    if value == "1025":
        planned = run_etl("plan", "--shards", value)
        assert planned.returncode == ExitCode.CONFIG and "'1025' must be a whole number from 1 to 1024" in planned.stderr


def test_the_float_bounds_accept_their_edges(make_settings):
    edges = make_settings(**{name: "86400" for name in SECONDS}, ETL_IMAGE_RETRY_BACKOFF_MINUTES="5256000")
    assert [getattr(edges, f) for f in ("connect_timeout", "read_timeout", "progress_seconds")] == [86400.0] * 3
    assert edges.image_retry_backoff_minutes == 5_256_000.0
    zeros = make_settings(ETL_RETRY_MAX_WAIT="0", ETL_STOP_GRACE="0", ETL_PROGRESS_SECONDS="0", ETL_IMAGE_RETRY_BACKOFF_MINUTES="0")
    assert (zeros.retry_max_wait, zeros.stop_grace, zeros.progress_seconds, zeros.image_retry_backoff_minutes) == (0, 0, 0, 0)


@pytest.mark.badinput("ETL_READ_TIMEOUT=inf: the run exits 2 naming it (every image failed with an OverflowError)")
def test_a_run_with_an_infinite_read_timeout_exits_2_naming_it(run_etl):
    result = run_etl("run", env={"ETL_SOURCES": "mock", "ETL_READ_TIMEOUT": "inf"})
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr[-2000:]
    assert "ETL_READ_TIMEOUT='inf' is invalid: must be a positive number, at most 86,400 (one day)" in result.stderr


def test_choices_and_bounds_accept_their_edges_and_fold_case(make_settings):
    settings = make_settings(
        ETL_LOG_LEVEL=" warning ", ETL_LOG_FORMAT="JSON", ETL_DELETED_AT_SOURCE="Forget", ETL_MAX_REDIRECTS="0",
        ETL_RETRY_MAX_WAIT="0", SENTIMENT_THRESHOLD="0", ETL_SIMILAR_MAX_DISTANCE="7",
    )  # fmt: skip
    assert (settings.log_level, settings.log_format, settings.deleted_at_source) == ("WARNING", "json", "forget")
    assert (settings.max_redirects, settings.retry_max_wait, settings.sentiment_threshold) == (0, 0.0, 0.0)
    assert settings.similar_max_distance == 7


def test_missing_required_setting_is_named(make_settings):
    settings = make_settings()
    with pytest.raises(ConfigError, match="YOUTUBE_API_KEY is not set"):
        settings.source("youtube").require("api_key")
    make_settings(YOUTUBE_API_KEY="k").source("youtube").require("api_key")  # set: no error
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        settings.require("database_url")  # the core settings keep theirs


def test_secrets_never_in_repr(make_settings):
    settings = make_settings(
        DATABASE_URL="postgresql://archiver:pg-pass-5150@db.internal/archive",
        YOUTUBE_API_KEY="yt-key-7f3a9c",
        TWITTER_BEARER_TOKEN="tw-bearer-c0ffee",
        INSTAGRAM_ACCESS_TOKEN="ig-token-beef42",
    )
    shown = repr(settings) + str(settings)
    for secret in ("pg-pass-5150", "yt-key-7f3a9c", "tw-bearer-c0ffee", "ig-token-beef42"):
        assert secret not in shown
    assert settings.source("youtube").api_key.reveal() == "yt-key-7f3a9c"
    assert isinstance(settings.source("youtube").api_key, Secret)
    assert "tw-bearer-c0ffee" not in repr(settings.source("twitter")) + str(settings.source("twitter"))
    assert set(settings.secrets()) >= {"pg-pass-5150", "yt-key-7f3a9c", "tw-bearer-c0ffee", "ig-token-beef42"}


def test_malformed_secret_value_is_not_echoed(make_settings):
    with pytest.raises(ConfigError) as info:
        make_settings(DATABASE_URL="mysql://user:hunter22@db/archive")
    assert "hunter22" not in str(info.value)


def test_empty_values_mean_default(make_settings):
    assert make_settings(ETL_MAX_IMAGE_BYTES="  ").max_image_bytes == 20 * 1024 * 1024


def test_settings_are_frozen(make_settings):
    settings = make_settings()
    with pytest.raises(AttributeError):
        settings.s3_bucket = "other"  # type: ignore[misc]


def test_dotenv_is_read_under_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env_file = tmp_path / ".env"
    env_file.write_text("ETL_CONCURRENCY=3\nS3_PREFIX=from-file\n")
    monkeypatch.setenv("S3_PREFIX", "from-env")
    monkeypatch.delenv("ETL_CONCURRENCY", raising=False)
    settings = load_settings(dotenv_path=env_file)
    assert settings.concurrency == 3
    assert settings.s3_prefix == "from-env/"


def test_cli_exits_2_naming_the_bad_setting(run_etl):
    result = run_etl("run", "--dry-run", env={"ETL_MAX_IMAGE_BYTES": "huge"})
    assert result.returncode == ExitCode.CONFIG
    assert "ETL_MAX_IMAGE_BYTES" in result.stderr


def test_misspellings_of_our_settings_and_nothing_else():
    from etl.config import misspelled_settings

    env = {name: "x" for name in ("S3_BUKET", "ETL_SOURCE", "DATABASE_URI", "YOUTUBE_CHANNEL_ID", "S3_BUCKET", "ETL_PYTHON",
                                  "ETL_CRON_LOG", "AWS_ENDPOINT_URL_S3", "PATH", "ETL_SOMETHING_ELSE_ENTIRELY")}  # fmt: skip
    assert misspelled_settings(env) == [
        ("DATABASE_URI", "DATABASE_URL"), ("ETL_SOURCE", "ETL_SOURCES"), ("S3_BUKET", "S3_BUCKET"),
        ("YOUTUBE_CHANNEL_ID", "YOUTUBE_CHANNEL_IDS"),
    ]  # fmt: skip


def test_the_variables_the_cron_wrapper_reads_are_known_and_listed_in_one_place():
    """scripts/cron_run.sh reads ETL_PYTHON, ETL_CRON_LOG and ETL_CRON_LOCK (README, "Scheduling with cron"); each is
    known, not a misspelling of another (ETL_CRON_LOCK was once taken for ETL_CRON_LOG), and the list is the script's."""
    import re

    from etl.config import CRON_SCRIPT_VARIABLES, SETTING_PREFIXES, misspelled_settings
    from tests.conftest import ROOT

    script = (ROOT / "scripts" / "cron_run.sh").read_text()
    read = {name for name in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script) if name.startswith(SETTING_PREFIXES)}
    assert read == set(CRON_SCRIPT_VARIABLES)
    assert misspelled_settings({name: "/var/lock/archiver.lock" for name in CRON_SCRIPT_VARIABLES}) == []


def test_check_passes_with_the_documented_etl_cron_lock(run_etl, tmp_path):
    result = run_etl("check", env={"ETL_SOURCES": "mock", "ETL_CRON_LOCK": str(tmp_path / "cron.lock")})
    assert "ETL_CRON_LOCK" not in result.stdout + result.stderr, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("env", "sources"),
    [({}, ("mock",)), ({"DATABASE_URL": "postgresql://h/db"}, ()), ({"DATABASE_URL": "postgresql://h/db", "ETL_SOURCES": "jsonl"}, ("jsonl",))],
)
def test_the_mock_default_is_for_the_embedded_set_up_only(make_settings, env, sources):
    assert make_settings(**env).sources == sources


def test_set_but_empty_etl_sources_is_refused(make_settings):
    with pytest.raises(ConfigError, match="ETL_SOURCES"):
        make_settings(ETL_SOURCES=" , ")


def test_a_source_reads_only_its_own_settings(make_settings):
    settings = make_settings(YOUTUBE_QUERY="sunsets", TWITTER_QUERY="#sunset")
    youtube = settings.source("youtube")
    assert (youtube.query, youtube.daily_quota, youtube.channel_ids) == ("sunsets", 10000, ())
    with pytest.raises(AttributeError, match="the youtube source declares no setting 'bearer_token'"):
        youtube.bearer_token  # noqa: B018  (another platform's setting is not reachable from here)
    with pytest.raises(AttributeError):
        youtube.query = "other"  # type: ignore[misc]
    assert not hasattr(settings, "youtube_query")  # no longer a field of the core settings


def _declaring_source(monkeypatch: pytest.MonkeyPatch, name: str, *declared: object) -> None:
    """Register a source `name` whose module declares `declared` (undone after the test)."""
    import sys
    import types

    from etl.sources import REGISTRY
    from etl.sources.base import Source

    module = types.ModuleType(f"test_source_{name}")
    module.SETTINGS = declared  # type: ignore[attr-defined]
    cls = type(f"{name.title()}Source", (Source,), {"name": name, "__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(REGISTRY, name, cls)


@pytest.mark.badinput("a source's own setting malformed, or declared twice")
def test_a_registered_source_s_settings_are_read_validated_and_checked_for_clashes(make_settings, monkeypatch):
    from etl.config import Setting, all_settings, positive_int

    _declaring_source(monkeypatch, "kite", Setting("KITE_PAGES", positive_int, 3, "pages a run reads"))
    assert make_settings(KITE_PAGES="7").source("kite").pages == 7
    assert make_settings().source("kite").pages == 3
    assert ("kite", "KITE_PAGES") in [(group, s.env) for group, s in all_settings()]
    with pytest.raises(ConfigError, match="KITE_PAGES='none' is invalid"):
        make_settings(KITE_PAGES="none")
    _declaring_source(monkeypatch, "clash", Setting("ETL_SOURCES", positive_int, 1, "taken"))
    with pytest.raises(ConfigError, match="ETL_SOURCES is declared by the clash source and by the core settings"):
        make_settings()
