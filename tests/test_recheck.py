"""Re-checking held posts at their platform (issue 18, deleted at source): X's batch compliance jobs, Bluesky's
getPosts, Mastodon's statuses/:id and Reddit's /api/info, each against a local fake, through `etl.py run` on a
real PostgreSQL and the local store."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl.errors import ExitCode
from tests.conftest import query
from tests.platform_bluesky import FakeBluesky, bluesky_env, serve_get_posts
from tests.platform_mastodon import FakeMastodon, mastodon_env
from tests.platform_reddit import FakeReddit, reddit_env, serve_info
from tests.platform_twitter import TOKEN, FakeCompliance, serve_fixtures
from tests.support import Reply, jpeg_bytes, record, write_jsonl

BASE = {"ETL_ALLOW_PRIVATE_HOSTS": "true", "ETL_IMAGE_RETRY_BACKOFF_MINUTES": "0", "ETL_RETRY_MAX_WAIT": "0.05"}


def seed(run_etl, http_server, tmp_path: Path, platform: str, ids: list[str]) -> dict[str, str]:
    """Held posts of `platform` (one image each, created a day apart in 2020, oldest first), imported through
    jsonl; returns post_id -> its image's storage key."""
    lines = []
    for n, post_id in enumerate(ids):
        path = f"/seed/{n}.jpg"
        http_server.routes[path] = Reply(body=jpeg_bytes(20 + n, 12), content_type="image/jpeg")
        lines.append(record(platform=platform, post_id=post_id, created_at=f"2020-01-{n + 1:02d}T12:00:00Z",
                            image_urls=[http_server.url(path)]))  # fmt: skip
    result = run_etl("run", "--source", "jsonl", "--input", str(write_jsonl(tmp_path / "seed.jsonl", lines)), env=BASE)
    assert result.returncode == 0, result.stdout + result.stderr
    return {pid: key for pid, key in query(run_etl.dsn, "SELECT post_id, storage_key FROM post_media")}


@pytest.fixture
def etl(run_etl, db):
    run_etl.dsn = db.dsn
    return run_etl


def marked(dsn: str, platform: str) -> list[str]:
    rows = query(dsn, "SELECT post_id FROM social_posts WHERE platform = %s AND deleted_at_source IS NOT NULL"
                 " ORDER BY post_id", (platform,))  # fmt: skip
    return [r[0] for r in rows]


def checked(dsn: str, platform: str) -> list[str]:
    return [r[0] for r in query(dsn, "SELECT post_id FROM post_checks WHERE platform = %s ORDER BY post_id", (platform,))]


BSKY = [f"at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3held{n:04d}" for n in range(30)]


@pytest.mark.parametrize("policy", ["mark", "forget"])
def test_bluesky_post_missing_from_get_posts_is_marked_or_forgotten(etl, http_server, tmp_path, policy):
    keys = seed(etl, http_server, tmp_path, "bluesky", BSKY[:3])
    FakeBluesky(http_server)
    calls = serve_get_posts(http_server, gone={BSKY[1]})
    env = {**bluesky_env(http_server, tmp_path, BLUESKY_QUERY=""), **BASE, "ETL_DELETED_AT_SOURCE": policy}
    result = etl("run", "--source", "bluesky", env=env)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert f"1 post(s) gone at source ({policy})" in result.stdout
    assert set(BSKY[:3]) <= set(sum(calls, []))
    objects = tmp_path / "data" / "objects"
    if policy == "mark":
        assert marked(etl.dsn, "bluesky") == [BSKY[1]]
        assert (objects / keys[BSKY[1]]).exists()
    else:
        assert query(etl.dsn, "SELECT count(*) FROM social_posts WHERE post_id = %s", (BSKY[1],)) == [(0,)]
        assert not (objects / keys[BSKY[1]]).exists()
        assert query(etl.dsn, "SELECT reason FROM forgotten_posts") == [
            ("deleted at source: deleted on Bluesky (getPosts no longer returns it)",)
        ]
        assert marked(etl.dsn, "bluesky") == []
    for untouched in (BSKY[0], BSKY[2]):  # the rest stay, images and all
        assert (objects / keys[untouched]).exists()
        assert query(etl.dsn, "SELECT deleted_at_source FROM social_posts WHERE post_id = %s", (untouched,)) == [(None,)]


def test_bluesky_recheck_asks_25_uris_a_call(etl, http_server, tmp_path):
    seed(etl, http_server, tmp_path, "bluesky", BSKY)
    FakeBluesky(http_server)
    calls = serve_get_posts(http_server, gone={BSKY[0], BSKY[29]})
    result = etl("run", "--source", "bluesky", env={**bluesky_env(http_server, tmp_path, BLUESKY_QUERY=""), **BASE})
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert max(len(c) for c in calls) == 25 and set(BSKY) <= set(sum(calls, []))
    assert marked(etl.dsn, "bluesky") == sorted([BSKY[0], BSKY[29]])


REDDIT = [f"1a{n:05d}" for n in range(5)]


def test_recheck_is_bounded_and_goes_oldest_checked_first(etl, http_server, tmp_path):
    seed(etl, http_server, tmp_path, "reddit", REDDIT)
    FakeReddit(http_server)
    calls = serve_info(http_server, deleted={REDDIT[3]}, removed={REDDIT[1]: "moderator", REDDIT[2]: "automod_filtered"})
    env = {**reddit_env(http_server, tmp_path), **BASE, "ETL_RECHECK_POSTS": "2"}
    first = etl("run", "--source", "reddit", env=env)
    assert first.returncode == ExitCode.OK, first.stdout + first.stderr
    assert calls == [REDDIT[:2]]  # two per run, the oldest of the never-checked
    assert checked(etl.dsn, "reddit") == REDDIT[:2]
    assert marked(etl.dsn, "reddit") == [REDDIT[1]]
    assert query(etl.dsn, "SELECT per_source->'reddit'->>'rechecked' FROM etl_runs ORDER BY id DESC LIMIT 1") == [("2",)]
    second = etl("run", "--source", "reddit", env=env)
    assert second.returncode == ExitCode.OK, second.stdout + second.stderr
    assert calls[1] == REDDIT[2:4]  # automod_filtered (held for review) is not gone; [deleted] is
    assert marked(etl.dsn, "reddit") == [REDDIT[1], REDDIT[3]]
    third = etl("run", "--source", "reddit", env=env)
    assert third.returncode == ExitCode.OK, third.stdout + third.stderr
    # The fixture listing's four posts (archived by the first run, never checked) come before checked ones.
    assert len(calls[2]) == 2 and not set(calls[2]) & set(REDDIT[:4])
    off = etl("run", "--source", "reddit", env={**env, "ETL_RECHECK_POSTS": "0"})
    assert off.returncode == ExitCode.OK, off.stdout + off.stderr
    assert len(calls) == 3  # 0 = off: no call at all


def test_mastodon_status_answering_404_is_gone_and_only_this_instances_are_asked(etl, http_server, tmp_path):
    base = http_server.base
    local = [f"{base}/users/ana/statuses/11392000000000{n:04d}" for n in range(3)]
    remote = "https://photo.social/users/tom/statuses/113919000000000777"
    seed(etl, http_server, tmp_path, "mastodon", [*local, remote])
    FakeMastodon(http_server)
    for n, uri in enumerate(local):
        path = f"/api/v1/statuses/{uri.rsplit('/', 1)[-1]}"
        alive = Reply(body=f'{{"id": "{path.rsplit("/", 1)[-1]}", "uri": "{uri}"}}'.encode(), content_type="application/json")
        gone = Reply(status=404, body=b'{"error":"Record not found"}', content_type="application/json")
        http_server.routes[path] = gone if n == 1 else alive
    result = etl("run", "--source", "mastodon", env={**mastodon_env(http_server, tmp_path), **BASE})
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert marked(etl.dsn, "mastodon") == [local[1]]
    assert checked(etl.dsn, "mastodon") == sorted(local)  # the remote status and the fixtures' are not asked
    asked = [p for m, p, _ in http_server.requests if p.startswith("/api/v1/statuses/")]
    assert sorted(asked) == sorted(f"/api/v1/statuses/{u.rsplit('/', 1)[-1]}" for u in local)


TWEETS = ["1460323737035677698", "1460323737035677699", "1460323737035677700", "1460323737035677701"]


def twitter_env(http_server, **extra: str) -> dict[str, str]:
    return {"TWITTER_BEARER_TOKEN": TOKEN, "TWITTER_USERNAMES": "harbourlights", "TWITTER_API_BASE": http_server.base,
            **BASE, **extra}  # fmt: skip


def test_x_compliance_job_deletes_are_applied_and_the_job_spans_runs(etl, http_server, tmp_path):
    seed(etl, http_server, tmp_path, "twitter", TWEETS)
    serve_fixtures(http_server)
    fake = FakeCompliance(http_server, statuses=("in_progress", "complete"))
    first = etl("run", "--source", "twitter", env=twitter_env(http_server))
    # (exit 1 for the fixtures' images on pbs.twimg.com, which this offline fake does not serve)
    assert first.returncode == ExitCode.PARTIAL, first.stdout + first.stderr
    assert "re-checking held posts" not in first.stdout, first.stdout + first.stderr
    assert fake.created == 1 and marked(etl.dsn, "twitter") == []  # X is still working on it
    uploaded = fake.uploads[0].decode().split()
    assert set(TWEETS) <= set(uploaded)
    # The signed URLs carry their own credentials: the bearer token never goes there.
    assert all("Authorization" not in h for h in fake.job_headers)
    second = etl("run", "--source", "twitter", env=twitter_env(http_server, ETL_DELETED_AT_SOURCE="forget"))
    assert second.returncode == ExitCode.PARTIAL, second.stdout + second.stderr  # the images again, nothing else
    assert "re-checking held posts" not in second.stdout, second.stdout + second.stderr
    assert "2 post(s) gone at source (forget)" in second.stdout
    assert fake.created == 1  # one job at a time: the pending one was read, no new one
    # delete (deleted, protected) -> forgotten; scrub_geo is no deletion; an id not held is ignored.
    assert query(etl.dsn, "SELECT post_id, reason FROM forgotten_posts ORDER BY post_id") == [
        (TWEETS[0], "deleted at source: X compliance: deleted"),
        (TWEETS[2], "deleted at source: X compliance: protected"),
    ]
    assert {TWEETS[1], TWEETS[3]} <= set(checked(etl.dsn, "twitter"))
    assert query(etl.dsn, "SELECT state FROM recheck_state WHERE platform = 'twitter'") == [({},)]
    for output in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert "X-Goog-Signature" not in output and TOKEN not in output


@pytest.mark.fault("a compliance job X reports failed ends the re-check, is reported, and its posts are asked again")
def test_x_compliance_job_that_failed_is_reported_and_retried(etl, http_server, tmp_path):
    seed(etl, http_server, tmp_path, "twitter", TWEETS[:2])
    serve_fixtures(http_server)
    fake = FakeCompliance(http_server, statuses=("failed", "complete"))
    result = etl("run", "--source", "twitter", env=twitter_env(http_server))
    assert result.returncode == ExitCode.PARTIAL, result.stdout + result.stderr
    assert "re-checking held posts" in result.stdout and "'failed'" in result.stdout
    assert checked(etl.dsn, "twitter") == [] and marked(etl.dsn, "twitter") == []
    assert query(etl.dsn, "SELECT count(*) FROM social_posts WHERE platform = 'twitter'")[0][0] > 2  # the fetch went on
    again = etl("run", "--source", "twitter", env=twitter_env(http_server))
    assert again.returncode == ExitCode.PARTIAL, again.stdout + again.stderr  # the fixtures' images, as above
    assert "re-checking held posts" not in again.stdout, again.stdout + again.stderr
    assert fake.created == 2 and marked(etl.dsn, "twitter") == [TWEETS[0]]


@pytest.mark.fault("the platform failing the re-check (HTTP 500s past the retries) ends it cleanly; nothing is marked")
def test_recheck_errors_end_it_cleanly_and_are_reported(etl, http_server, tmp_path):
    seed(etl, http_server, tmp_path, "bluesky", BSKY[:30])
    FakeBluesky(http_server)
    calls = serve_get_posts(http_server, gone=set(BSKY))
    answers = iter([None] + [Reply(status=500, body=b"{}", content_type="application/json")] * 20)
    good = http_server.routes["/xrpc/app.bsky.feed.getPosts"]

    def flaky(handler):  # the first call answers (25 posts), then the AppView fails
        reply = next(answers)
        return good(handler) if reply is None else reply

    http_server.routes["/xrpc/app.bsky.feed.getPosts"] = flaky
    result = etl("run", "--source", "bluesky", env={**bluesky_env(http_server, tmp_path, BLUESKY_QUERY=""), **BASE})
    assert result.returncode == ExitCode.PARTIAL, result.stdout + result.stderr
    assert "bluesky: re-checking held posts" in result.stdout and "Traceback" not in result.stderr
    first = calls[0]
    assert sorted(checked(etl.dsn, "bluesky")) == sorted(first)  # what was answered is recorded, the rest not
    assert sorted(marked(etl.dsn, "bluesky")) == sorted(first)
    assert query(etl.dsn, "SELECT count(*) FROM social_posts WHERE platform = 'bluesky'")[0][0] > 30  # feed archived
