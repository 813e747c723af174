"""Mastodon: a hashtag timeline and an account against a local fake instance (Link paging, since_id, HTML text)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest

from etl.sources.base import FetchWindow
from etl.sources.mastodon import MastodonSource, html_to_text
from tests.conftest import query
from tests.platform_mastodon import ACCOUNT_URIS, LOOKUP, STATUSES, TAG, TAG_URIS, FakeMastodon, mastodon_env
from tests.support import Reply, stored_objects, stream_states


def source_for(make_settings, server, tmp_path, **extra):
    env = mastodon_env(server, tmp_path, **extra)
    env.pop("ETL_DATA_DIR")
    return MastodonSource(make_settings(**env))


def test_html_content_becomes_the_text_a_reader_sees():
    html = '<p>A &amp; B &lt;3</p><p>line one<br>line two <a href="x"><span class="invisible">https://</span><span class="ellipsis">ex.org/lo</span><span class="invisible">ng</span></a></p>'
    assert html_to_text(html) == "A & B <3\n\nline one\nline two https://ex.org/long"


@pytest.mark.e2e
def test_mastodon_run_archives_hashtag_and_account_then_rerun_fetches_nothing_twice(run_etl, db, http_server, tmp_path):
    fake = FakeMastodon(http_server)
    env = {**mastodon_env(http_server, tmp_path), "ETL_SOURCES": "mastodon", "ETL_LOG_LEVEL": "DEBUG"}
    result = run_etl("run", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "299 of 300 requests left" in output
    rows = query(db.dsn, "SELECT post_id, caption, hashtags, like_count FROM social_posts WHERE platform = 'mastodon'")
    by_id = {r[0]: r[1:] for r in rows}
    assert sorted(by_id) == sorted(set(TAG_URIS + ACCOUNT_URIS))
    assert by_id[ACCOUNT_URIS[0]][0] == "eye strain: bright flashes\n\nProof sheet from today <3"
    assert by_id[TAG_URIS[2]][2] == 30  # the reblogged original's counts
    media = query(db.dsn, "SELECT post_id, position, source_url FROM post_media WHERE platform = 'mastodon' ORDER BY 1, 2")
    assert [(m[0], m[1]) for m in media if m[0] == TAG_URIS[0]] == [(TAG_URIS[0], 0), (TAG_URIS[0], 1)]
    assert media[[m[0] for m in media].index(TAG_URIS[1])][2].endswith("/previews/waves.png")  # gifv -> preview
    assert len(stored_objects(tmp_path / "data" / "objects")) == len(media) == 5
    assert stream_states(db.dsn, "mastodon") == {"streams": {"tag:sunset": {"after": "113920000000000003"},
                                  "account:ana@mastodon.example": {"after": "113920500000000004"}}}  # fmt: skip

    http_server.requests.clear()
    again = run_etl("run", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    calls = fake.api_calls("/api/")
    # Each listing is read again from the id minted ETL_OVERLAP_MINUTES (60) before its saved one (a status from
    # another server that arrived late has the id of its published time), then down its next page to that id.
    hour_before = lambda sid: str(((int(sid) >> 16) - 3_600_000) << 16)  # noqa: E731
    assert [(p, q.get("since_id"), q.get("max_id")) for p, q, _ in calls] == [
        (TAG, hour_before("113920000000000003"), None), (TAG, None, "113920000000000003"), (LOOKUP, None, None),
        (STATUSES, hour_before("113920500000000004"), None), (STATUSES, None, "113920500000000004"),
    ]  # fmt: skip
    assert len(http_server.requests) == 5  # nothing else: no image again


@pytest.mark.fault("Mastodon access token refused (401): the source stops with a message naming MASTODON_ACCESS_TOKEN")
def test_refused_token_names_the_setting_and_stops_the_source(make_settings, http_server, tmp_path):
    FakeMastodon(http_server, token="right-token")
    with source_for(make_settings, http_server, tmp_path, MASTODON_ACCESS_TOKEN="wrong-token-77") as source:
        assert list(source.fetch(FetchWindow())) == []
    assert source.rejected == 1
    assert "MASTODON_ACCESS_TOKEN" in source.rejects[0] and "wrong-token-77" not in source.rejects[0]
    assert "not read either: Mastodon @ana@mastodon.example" in source.rejects[0]


def test_instance_requiring_a_token_for_public_timelines_says_so(make_settings, http_server, tmp_path):
    FakeMastodon(http_server, token="right-token")
    with source_for(make_settings, http_server, tmp_path, MASTODON_ACCOUNTS="") as source:
        assert list(source.fetch(FetchWindow())) == []
    assert "may require MASTODON_ACCESS_TOKEN" in source.rejects[0]
    with source_for(make_settings, http_server, tmp_path, MASTODON_ACCOUNTS="", MASTODON_ACCESS_TOKEN="right-token") as source:
        assert [p.post_id for p in source.fetch(FetchWindow())] == TAG_URIS


@pytest.mark.fault("Mastodon 5xx on the second hashtag page: that stream ends, its first page kept, the account still read")
def test_server_error_mid_stream_keeps_the_first_page_and_state(make_settings, http_server, tmp_path):
    fake = FakeMastodon(http_server)
    first = fake.reply(fake.json("tag_page1.json"), headers=fake.headers("113919000000000002", TAG))
    fake.overrides[TAG] = [first] + [Reply(status=502, body=b"bad gateway", content_type="text/plain")] * 10
    saved = {"streams": {"tag:sunset": {"after": "100"}}}
    with source_for(make_settings, http_server, tmp_path) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor=saved))]
    assert ids == TAG_URIS[:2] + ACCOUNT_URIS[:1]
    assert "HTTP 502" in source.rejects[0]
    assert source.cursor["streams"]["tag:sunset"] == {"after": "100"}
    assert source.cursor["streams"]["account:ana@mastodon.example"] == {"after": "113920500000000004"}


@pytest.mark.fault("Mastodon 429 whose X-RateLimit-Reset (an ISO time) has passed: retried at once, then archived")
def test_rate_limit_reset_as_an_iso_time_is_waited_for(make_settings, http_server, tmp_path):
    fake = FakeMastodon(http_server)
    fake.overrides[TAG] = [fake.error("error_429.json", 429, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2020-01-01T00:00:00.000Z"})]
    with source_for(make_settings, http_server, tmp_path, MASTODON_ACCOUNTS="") as source:
        assert [p.post_id for p in source.fetch(FetchWindow())] == TAG_URIS
    assert len(fake.api_calls(TAG)) == 4  # the 429, then the two pages and an empty third


@pytest.mark.badinput("Mastodon unknown account in MASTODON_ACCOUNTS: reported by name, the hashtag still archived")
def test_unknown_account_is_reported_and_the_rest_archived(make_settings, http_server, tmp_path):
    FakeMastodon(http_server)
    with source_for(make_settings, http_server, tmp_path, MASTODON_ACCOUNTS="nobody@mastodon.example") as source:
        assert [p.post_id for p in source.fetch(FetchWindow())] == TAG_URIS
    assert source.rejects == [f"mastodon: MASTODON_ACCOUNTS @nobody@mastodon.example: no such account on {http_server.base}"]


def test_without_link_headers_pages_by_max_id(make_settings, http_server, tmp_path):
    FakeMastodon(http_server, link_headers=False)
    with source_for(make_settings, http_server, tmp_path, MASTODON_ACCOUNTS="") as source:
        assert [p.post_id for p in source.fetch(FetchWindow())] == TAG_URIS
    assert json.dumps(source.rejects) == "[]"


@pytest.mark.fault("a backfill chunk whose stream fails mid-way (502, a 429 an hour off): exit 1, the chunk not done, redone next time")
@pytest.mark.parametrize("failure", ["server error", "rate limit"])
def test_a_backfill_chunk_cut_by_a_stream_error_is_not_recorded_done(run_etl, db, http_server, tmp_path, failure):
    # The stream's error was only reported (the other streams go on, in a run), so the chunk was recorded done, and
    # the same backfill run again, as the README says, skipped it: the posts past the error were never backfilled.
    fake = FakeMastodon(http_server)
    first = fake.reply(fake.json("tag_page1.json"), headers=fake.headers("113919000000000002", TAG))
    if failure == "server error":
        cut = Reply(status=502, body=b"bad gateway", content_type="text/plain")
    else:
        reset = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
        cut = fake.error("error_429.json", 429, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
    fake.overrides[TAG] = [first] + [cut] * 10
    env = mastodon_env(http_server, tmp_path, MASTODON_ACCOUNTS="", ETL_HTTP_RETRIES="2")
    args = ("backfill", "--source", "mastodon", "--since", "2025-01-01", "--until", "2026-04-01", "--chunk-days", "1000")
    stopped = run_etl(*args, env=env)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    held = {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts")}
    assert TAG_URIS[0] in held and TAG_URIS[2] not in held  # the first page loaded, the second never read
    assert query(db.dsn, "SELECT count(*) FROM etl_backfill_chunks") == [(0,)]
    fake.overrides[TAG] = []  # the instance answers again
    again = run_etl(*args, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(TAG_URIS) <= {r[0] for r in query(db.dsn, "SELECT post_id FROM social_posts")}
    assert query(db.dsn, "SELECT count(*) FROM etl_backfill_chunks") == [(1,)]


# A status from another server gets the id of its published time (`around_create Mastodon::Snowflake::Callbacks`:
# Mastodon::Snowflake.id_at(created_at) when created_at is in the past; mastodon/mastodon lib/mastodon/snowflake.rb,
# app/models/status.rb), so one that federates in late sits below ids already read. The fake pages as Mastodon's
# paginate_by_id does (since_id/max_id exclusive, newest first, Link rel="next" with max_id and without since_id).

def id_at(moment: str, tail: int) -> str:
    """Mastodon::Snowflake.id_at: milliseconds since the epoch shifted 16 bits, plus a low sequence part."""
    at = datetime.fromisoformat(moment.replace("Z", "+00:00")).astimezone(timezone.utc)
    return str((int(at.timestamp() * 1000) << 16) + tail)


def federated_status(sid: str, created: str, uri: str, text: str) -> dict:
    host = urlsplit(uri).hostname
    user = uri.split("/users/")[1].split("/")[0]
    return {
        "id": sid, "created_at": created, "in_reply_to_id": None, "in_reply_to_account_id": None,
        "sensitive": False, "spoiler_text": "", "visibility": "public", "language": "en",
        "uri": uri, "url": f"https://{host}/@{user}/{uri.rsplit('/', 1)[1]}",
        "replies_count": 0, "reblogs_count": 0, "favourites_count": 1, "edited_at": None,
        "content": f"<p>{text} <a href=\"https://mastodon.example/tags/sunset\" class=\"mention hashtag\" "
                   "rel=\"tag\">#<span>sunset</span></a></p>",
        "reblog": None, "application": None,
        "account": {"id": "1", "username": user, "acct": user if host == "mastodon.example" else f"{user}@{host}",
                    "display_name": user, "url": f"https://{host}/@{user}"},
        "media_attachments": [], "mentions": [], "tags": [{"name": "sunset", "url": "https://mastodon.example/tags/sunset"}],
        "emojis": [], "card": None, "poll": None,
    }  # fmt: skip


FED_SEEN = federated_status(id_at("2026-03-10T12:00:00.000Z", 7), "2026-03-10T12:00:00.000Z",
              "https://mastodon.example/users/ana/statuses/900001", "archived by the last run (12:00:30)")  # fmt: skip
# Published on photo.social at 11:52, delivered to this instance at 12:04 (after the last run): id_at(11:52).
FED_LATE = federated_status(id_at("2026-03-10T11:52:00.000Z", 3), "2026-03-10T11:52:00.000Z",
              "https://photo.social/users/tom/statuses/551", "federated in late")  # fmt: skip
FED_NEW = federated_status(id_at("2026-03-10T12:10:00.000Z", 9), "2026-03-10T12:10:00.000Z",
             "https://mastodon.example/users/ana/statuses/900002", "posted after the last run")  # fmt: skip
FED_OLD = federated_status(id_at("2026-03-10T11:40:00.000Z", 1), "2026-03-10T11:40:00.000Z",
             "https://mastodon.example/users/ana/statuses/900000", "old")  # fmt: skip
FED_TIMELINE = sorted([FED_SEEN, FED_LATE, FED_NEW, FED_OLD], key=lambda s: int(s["id"]), reverse=True)  # as the instance holds it now


def test_a_status_that_federated_in_late_below_the_saved_id_is_archived(make_settings, http_server):
    def route(handler) -> Reply:
        params = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        page = [s for s in FED_TIMELINE
                if ("since_id" not in params or int(s["id"]) > int(params["since_id"]))
                and ("max_id" not in params or int(s["id"]) < int(params["max_id"]))][: int(params.get("limit", 20))]  # fmt: skip
        headers = {}
        if page:
            headers["Link"] = f'<{http_server.base}{TAG}?max_id={page[-1]["id"]}>; rel="next"'
        return Reply(body=json.dumps(page).encode(), content_type="application/json", headers=headers)

    http_server.routes[TAG] = route
    settings = make_settings(MASTODON_INSTANCE=http_server.base, MASTODON_HASHTAGS="sunset", ETL_RETRY_MAX_WAIT="0.05")
    saved = {"streams": {"tag:sunset": {"after": FED_SEEN["id"]}}}  # the last run (12:00:30) read down to FED_SEEN
    with MastodonSource(settings) as source:
        ids = [p.post_id for p in source.fetch(FetchWindow(cursor=saved))]
    assert FED_LATE["uri"] in ids, f"the status that federated in after the last run was lost: got {ids}"
